//! Scripted firmware behaviour: the scenario timeline and the faults its steps (or the
//! control socket) inject.

use log::warn;
use vdaq_wire::event::kind;

use super::scenario::{Action, Scenario, Timeline};
use super::settings::Settings;
use super::violations::{HeaderLie, ScriptedViolation};
use super::{Card, ReadBuffer, NS_PER_SEC};

/// Scripted faults in force.
#[derive(Debug, Default)]
pub(super) struct Faults {
    /// The loaded scenario's steps still to fire.
    pub(super) timeline: Option<Timeline>,
    /// Interrupts still to lose.
    pub(super) drop_interrupts: u32,
    /// No FIFO drain before this device time.
    pub(super) stall_until_ns: u64,
    /// Deterministic mode: frames up to this index are sampled while the FIFO is not drained.
    pub(super) stall_until_frame: u64,
    /// Buffers still to corrupt.
    pub(super) corrupt_buffers: u32,
    /// A step asked to close the connection.
    pub(super) disconnect_requested: bool,
    /// Completed buffers are held back until this device time.
    pub(super) delay_completions_until_ns: u64,
    /// Violations armed for the backend to commit (used ring, replies), oldest first.
    pub(super) violations: std::collections::VecDeque<ScriptedViolation>,
    /// Header lies armed for the next buffers with frames, oldest first.
    pub(super) header_lies: std::collections::VecDeque<HeaderLie>,
    /// No used-buffer interrupt before this real time.
    pub(super) no_interrupts_until_ns: u64,
    /// Interrupts an interrupt storm still owes.
    pub(super) interrupt_storm: u32,
}

impl<B: ReadBuffer> Card<B> {
    /// Loads a scenario; its clock starts at the next START (and again after each reset).
    pub fn set_scenario(&mut self, scenario: Scenario) {
        self.live.faults.timeline = Some(Timeline::new(&scenario));
        self.kept.scenario = Some(scenario);
    }

    /// Whether settings changed without the driver asking (`set_signal`, the control socket)
    /// since the last call: the driver is owed a configuration-change notification.
    pub fn take_settings_changed(&mut self) -> bool {
        std::mem::take(&mut self.live.settings_changed)
    }

    /// Whether a scenario step asked to close the connection (cleared by the call).
    pub fn take_disconnect_request(&mut self) -> bool {
        std::mem::take(&mut self.live.faults.disconnect_requested)
    }

    /// Fires the scenario steps that are due.
    pub(super) fn run_timeline(&mut self, now_ns: u64) {
        let Some(started) = self.live.clock.stream_started_ns else {
            return;
        };
        let next_frame = self.live.clock.next_frame;
        let Some(timeline) = self.live.faults.timeline.as_mut() else {
            return;
        };
        for step in timeline.due(now_ns.saturating_sub(started), next_frame) {
            log::info!("scenario line {}: {:?}", step.line, step.action);
            self.apply(step.action, now_ns);
        }
    }

    /// Applies a scripted action now (from a scenario step or the control socket).
    pub fn apply(&mut self, action: Action, now_ns: u64) {
        match action {
            Action::DropInterrupts(count) => {
                self.live.faults.drop_interrupts =
                    self.live.faults.drop_interrupts.saturating_add(count)
            }
            Action::DelayCompletions(duration) => {
                // Completions are held on the real clock (virtual time may run ahead or
                // behind it in deterministic mode).
                let real = self.real_time_ns(now_ns);
                self.live.faults.delay_completions_until_ns = real.saturating_add(duration);
            }
            Action::Stall(duration) => {
                // At most a minute of stall: bounded virtual time, no index wrap-around.
                let duration = duration.min(60 * 1_000_000_000);
                if self.kept.deterministic {
                    let frames =
                        u128::from(duration) * u128::from(self.live.settings.rate_hz) / NS_PER_SEC;
                    self.live.faults.stall_until_frame = self
                        .live
                        .clock
                        .next_frame
                        .saturating_add(u64::try_from(frames).unwrap_or(u64::MAX));
                } else {
                    self.live.faults.stall_until_ns = now_ns.saturating_add(duration);
                }
            }
            Action::CorruptCrc(count) => {
                self.live.faults.corrupt_buffers =
                    self.live.faults.corrupt_buffers.saturating_add(count)
            }
            Action::Fault(code) => {
                self.push_event(kind::FAULT, now_ns, u64::from(code), 0);
            }
            Action::NeedsReset => self.enter_needs_reset(vdaq_wire::event::fault::FIRMWARE, now_ns),
            Action::Trigger => {
                self.live.trigger.software_at = Some(self.live.clock.next_frame);
            }
            Action::Disconnect => self.live.faults.disconnect_requested = true,
            Action::Violate(violation) => self.violate(violation, now_ns),
            Action::SetSignal {
                signal,
                freq_mhz,
                amplitude_permille,
            } => {
                let changed = Settings {
                    signal,
                    signal_freq_mhz: freq_mhz.unwrap_or(self.live.settings.signal_freq_mhz),
                    amplitude_permille: amplitude_permille
                        .unwrap_or(self.live.settings.amplitude_permille),
                    ..self.live.settings
                };
                if !self.source_fits(&changed) {
                    warn!(
                        "set_signal to file ignored: no source with {} channels",
                        changed.channels
                    );
                    return;
                }
                if self.live.signal_segments.is_empty() {
                    // Frames sampled so far keep the signal they were sampled with.
                    self.live
                        .signal_segments
                        .push_back((0, self.live.settings.signal_params()));
                }
                self.live
                    .signal_segments
                    .push_back((self.live.clock.next_frame, changed.signal_params()));
                self.live.settings_changed |= changed != self.live.settings;
                self.live.settings = changed;
            }
        }
    }
}
