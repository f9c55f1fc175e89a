//! Which signal each frame is sampled with: signal changes mid-stream (`set_signal`) and the
//! file source of the `File` signal.

use vdaq_wire::SignalKind;

use super::settings::Settings;
use super::signal::SignalParams;
use super::source;
use super::{Card, ReadBuffer};

impl<B: ReadBuffer> Card<B> {
    /// Sets the samples the `File` signal replays.
    pub fn set_source(&mut self, source: std::sync::Arc<source::FileSource>) {
        self.kept.source = Some(source);
    }

    /// The signal frame `frame` is sampled with.
    pub(super) fn signal_at(&self, frame: u64) -> SignalParams {
        self.live
            .signal_segments
            .iter()
            .rev()
            .find(|(start, _)| *start <= frame)
            .map_or_else(|| self.live.settings.signal_params(), |(_, params)| *params)
    }

    /// The first signal change after `frame`, if any.
    pub(super) fn signal_change_after(&self, frame: u64) -> Option<u64> {
        self.live
            .signal_segments
            .iter()
            .map(|(start, _)| *start)
            .find(|&start| start > frame)
    }

    /// Whether a signal change starts exactly at `frame`.
    pub(super) fn signal_changes_at(&self, frame: u64) -> bool {
        frame > 0
            && self
                .live
                .signal_segments
                .iter()
                .any(|(start, _)| *start == frame)
    }

    /// Whether `settings` can be served: the `File` signal needs a source with as many
    /// channels as the frames.
    pub(super) fn source_fits(&self, settings: &Settings) -> bool {
        settings.signal != SignalKind::File
            || self
                .kept
                .source
                .as_ref()
                .is_some_and(|s| s.channels == settings.channels)
    }
}
