//! Triggers: the software TRIGGER command and the level/edge trigger SET_TRIGGER arms.

use vdaq_wire::control::CommandStatus;
use vdaq_wire::{DeviceState, SampleFormat};

use super::source;
use super::{Card, ReadBuffer};

/// Trigger state.
#[derive(Debug, Default)]
pub(super) struct Triggers {
    /// Frame a software trigger (command or scenario) fires at.
    pub(super) software_at: Option<u64>,
    /// The armed level/edge trigger.
    pub(super) armed: Option<HwTrigger>,
    /// Where its evaluation stands.
    pub(super) scan: TriggerState,
}

/// The armed level/edge trigger (SET_TRIGGER).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct HwTrigger {
    pub(super) mode: u8,
    pub(super) channel: u16,
    pub(super) threshold: f64,
    pub(super) post_frames: u64,
}

/// Where the trigger evaluation stands across blocks.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct TriggerState {
    /// Value of the watched channel in the last frame evaluated.
    pub(super) previous: Option<f64>,
    /// The trigger re-arms at this frame (after the last window).
    pub(super) rearm_frame: u64,
}

/// Evaluates `trigger` on `block` (frames from `first_frame`); returns the frames it fires at.
pub(super) fn scan_trigger(
    trigger: &HwTrigger,
    state: &mut TriggerState,
    format: SampleFormat,
    channels: u16,
    first_frame: u64,
    block: &[u8],
) -> Vec<u64> {
    use vdaq_wire::control::trigger_mode;
    let size = format.sample_bytes();
    let frame_bytes = size * usize::from(channels);
    let offset = usize::from(trigger.channel) * size;
    let mut fired = Vec::new();
    for (i, frame) in block.chunks_exact(frame_bytes).enumerate() {
        let value = source::decode(format, &frame[offset..offset + size]);
        let index = first_frame + i as u64;
        let hit = match (trigger.mode, state.previous) {
            (trigger_mode::LEVEL_ABOVE, _) => value >= trigger.threshold,
            (trigger_mode::LEVEL_BELOW, _) => value <= trigger.threshold,
            (trigger_mode::RISING, Some(prev)) => {
                prev < trigger.threshold && value >= trigger.threshold
            }
            (trigger_mode::FALLING, Some(prev)) => {
                prev > trigger.threshold && value <= trigger.threshold
            }
            _ => false,
        };
        state.previous = Some(value);
        if hit && index >= state.rearm_frame {
            fired.push(index);
            state.rearm_frame = index + trigger.post_frames;
        }
    }
    fired
}

impl<B: ReadBuffer> Card<B> {
    /// SET_TRIGGER: arms (or, with mode OFF, disarms) the level/edge trigger.
    pub fn set_trigger(&mut self, config: &vdaq_wire::control::TriggerConfig) -> CommandStatus {
        use vdaq_wire::control::trigger_mode;
        if config.mode == trigger_mode::OFF {
            self.live.trigger.armed = None;
            return CommandStatus::Ok;
        }
        let threshold = config.threshold_ppm.get() as i32;
        if config.mode > trigger_mode::FALLING
            || config.channel.get() >= self.live.settings.channels
            || !(-1_000_000..=1_000_000).contains(&threshold)
            || config.post_frames.get() == 0
            // No pre-trigger history is kept: a window reaching back is refused, not cut.
            || config.pre_frames.get() != 0
        {
            return CommandStatus::Invalid;
        }
        self.live.trigger.armed = Some(HwTrigger {
            mode: config.mode,
            channel: config.channel.get(),
            threshold: f64::from(threshold) / 1e6,
            post_frames: u64::from(config.post_frames.get()),
        });
        self.live.trigger.scan = TriggerState::default();
        CommandStatus::Ok
    }

    /// Software trigger: the next frame sampled is the trigger frame.
    pub fn trigger(&mut self) -> CommandStatus {
        match self.live.state {
            DeviceState::NeedsReset => CommandStatus::Busy,
            _ => {
                self.live.trigger.software_at = Some(self.live.clock.next_frame);
                CommandStatus::Ok
            }
        }
    }
}
