//! The card breaking the protocol on purpose, as a buggy card or firmware would (scenario
//! actions and `ctl inject`), so that drivers can be hardened against it: what each violation
//! is, its name in scenario files, and the ones the card model itself commits (lying headers,
//! an impossible configuration space, unknown events, interrupt storms and silence). The
//! virtqueue-level ones (used lengths, ids and indices, control replies) are committed by the
//! backend (`backend/violations.rs`), which takes them from the card when their chance comes.

use log::warn;
use vdaq_wire::buffer::BufferHeader;
use vdaq_wire::config::DaqConfig;

use super::{Card, ReadBuffer};

/// A header field a `bad_header` action makes lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderLie {
    /// `frame_count` one more than the used length holds.
    FrameCount,
    /// `channels` other than configured.
    Channels,
    /// `format` other than configured.
    Format,
    /// `sequence` skips one.
    Sequence,
    /// `first_frame` does not continue the stream (and no drop reported).
    FirstFrame,
    /// `timestamp_ns` earlier than the previous buffer's.
    Timestamp,
}

/// A configuration-space field a `bad_config` action makes impossible (spec 5.x.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigLie {
    /// `channels` 0.
    Channels,
    /// `max_channels` above the spec's 1024.
    MaxChannels,
    /// `format` an undefined code.
    Format,
    /// `min_rate_hz` above `max_rate_hz`.
    Rate,
    /// `fifo_frames` 0.
    Fifo,
    /// `firmware_version` of another major.
    Firmware,
    /// `model` not printable.
    Model,
    /// `state` an undefined code.
    State,
}

/// One way of breaking the virtio protocol or the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScriptedViolation {
    /// The next completed read's used length exceeds its buffer.
    UsedLenOverBuffer,
    /// The next completed read's used length is shorter than the header.
    UsedLenUnderHeader,
    /// A used entry naming descriptor `queue size` (there is none), before the next
    /// completed read.
    UsedIdOutOfRange,
    /// A used entry naming a descriptor the device does not hold, before the next completed
    /// read.
    UsedIdNotInFlight,
    /// The next completed read appears twice on the used ring.
    CompleteTwice,
    /// After the next completed read, the used index jumps this many entries ahead with
    /// nothing written.
    UsedIndexJump(u16),
    /// The next buffer with frames carries a header that lies about this field.
    Header(HeaderLie),
    /// The next command's reply has a used length shorter than the reply header.
    ReplyShort,
    /// The next command's reply has a used length beyond the reply area.
    ReplyLong,
    /// The next command's reply carries a status code the spec does not define.
    ReplyBadStatus,
    /// The next command is never answered (its chain stays with the device until reset).
    ReplyNever,
    /// From now on (across resets, for this connection) the configuration space shows an
    /// impossible value; the driver is notified of a configuration change.
    Config(ConfigLie),
    /// An event of a kind the spec does not define.
    UnknownEvent,
    /// This many data-queue interrupts in a row with nothing new on the used ring.
    InterruptStorm(u32),
    /// No used-buffer interrupt on any queue for this long (ns).
    NoInterrupts(u64),
}

/// The event kind an `unknown_event` carries: none the spec defines (5.x.6.9).
pub const UNKNOWN_EVENT_KIND: u32 = 0x7ffe;

/// The status code a `reply_bad_status` reply carries: none the spec defines (5.x.6.8).
pub const UNDEFINED_STATUS: u32 = 0xbad;

/// Most violations armed and not yet committed (a control-socket client cannot grow them
/// without bound).
pub const MAX_ARMED: usize = 64;

/// Most interrupts one `interrupt_storm` sends (each is a write to the frontend's eventfd,
/// a burst of them per clock tick).
pub const MAX_STORM: u32 = 100_000;

/// Names of the violation actions, for error messages and documentation.
pub const NAMES: &str = "used_len_over, used_len_under_header, used_id_out_of_range, \
     used_id_not_in_flight, complete_twice, used_index_jump, bad_header, reply_short, \
     reply_long, reply_bad_status, reply_never, bad_config, unknown_event, interrupt_storm, \
     no_interrupts";

/// Why a violation action was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ViolationError {
    /// `bad_header` without a known field.
    #[error(
        "action \"bad_header\" needs field = frame_count, channels, format, sequence, \
         first_frame or timestamp"
    )]
    HeaderField,
    /// `bad_config` without a known field.
    #[error(
        "action \"bad_config\" needs field = channels, max_channels, format, rate, fifo, \
         firmware, model or state"
    )]
    ConfigField,
    /// An interrupt storm without a count, or a longer one than the device sends.
    #[error("action \"interrupt_storm\" needs count 1 ..= {MAX_STORM}")]
    Storm,
    /// A duration that must be ≥ 1 ms was missing or 0.
    #[error("action \"{0}\" needs duration_ms >= 1")]
    NeedsDuration(&'static str),
    /// A jump that does not fit the ring index.
    #[error("action \"used_index_jump\" takes count 1 ..= 32768 (default: the queue size)")]
    Jump,
}

impl ScriptedViolation {
    /// The violation an action name stands for, with its parameters; Ok(None) if `name` is no
    /// violation.
    pub fn from_fields(
        name: &str,
        field: Option<&str>,
        count: Option<u32>,
        duration_ms: Option<u64>,
    ) -> Result<Option<Self>, ViolationError> {
        Ok(Some(match name {
            "used_len_over" => ScriptedViolation::UsedLenOverBuffer,
            "used_len_under_header" => ScriptedViolation::UsedLenUnderHeader,
            "used_id_out_of_range" => ScriptedViolation::UsedIdOutOfRange,
            "used_id_not_in_flight" => ScriptedViolation::UsedIdNotInFlight,
            "complete_twice" => ScriptedViolation::CompleteTwice,
            "used_index_jump" => match count {
                // 0: the queue size, known only when it happens.
                None => ScriptedViolation::UsedIndexJump(0),
                Some(n @ 1..=32768) => ScriptedViolation::UsedIndexJump(n as u16),
                Some(_) => return Err(ViolationError::Jump),
            },
            "bad_header" => ScriptedViolation::Header(match field {
                Some("frame_count") => HeaderLie::FrameCount,
                Some("channels") => HeaderLie::Channels,
                Some("format") => HeaderLie::Format,
                Some("sequence") => HeaderLie::Sequence,
                Some("first_frame") => HeaderLie::FirstFrame,
                Some("timestamp") => HeaderLie::Timestamp,
                _ => return Err(ViolationError::HeaderField),
            }),
            "reply_short" => ScriptedViolation::ReplyShort,
            "reply_long" => ScriptedViolation::ReplyLong,
            "reply_bad_status" => ScriptedViolation::ReplyBadStatus,
            "reply_never" => ScriptedViolation::ReplyNever,
            "bad_config" => ScriptedViolation::Config(match field {
                Some("channels") => ConfigLie::Channels,
                Some("max_channels") => ConfigLie::MaxChannels,
                Some("format") => ConfigLie::Format,
                Some("rate") => ConfigLie::Rate,
                Some("fifo") => ConfigLie::Fifo,
                Some("firmware") => ConfigLie::Firmware,
                Some("model") => ConfigLie::Model,
                Some("state") => ConfigLie::State,
                _ => return Err(ViolationError::ConfigField),
            }),
            "unknown_event" => ScriptedViolation::UnknownEvent,
            "interrupt_storm" => ScriptedViolation::InterruptStorm(
                count
                    .filter(|&c| (1..=MAX_STORM).contains(&c))
                    .ok_or(ViolationError::Storm)?,
            ),
            "no_interrupts" => ScriptedViolation::NoInterrupts(
                duration_ms
                    .filter(|&d| d > 0)
                    .ok_or(ViolationError::NeedsDuration("no_interrupts"))?
                    .saturating_mul(1_000_000),
            ),
            _ => return Ok(None),
        }))
    }

    /// Whether the backend commits it on the data queue's used ring.
    pub fn is_data_ring(&self) -> bool {
        matches!(
            self,
            ScriptedViolation::UsedLenOverBuffer
                | ScriptedViolation::UsedLenUnderHeader
                | ScriptedViolation::UsedIdOutOfRange
                | ScriptedViolation::UsedIdNotInFlight
                | ScriptedViolation::CompleteTwice
                | ScriptedViolation::UsedIndexJump(_)
        )
    }

    /// Whether the backend commits it on the next command's reply.
    pub fn is_reply(&self) -> bool {
        matches!(
            self,
            ScriptedViolation::ReplyShort
                | ScriptedViolation::ReplyLong
                | ScriptedViolation::ReplyBadStatus
                | ScriptedViolation::ReplyNever
        )
    }
}

impl<B: ReadBuffer> Card<B> {
    /// Arms (or, for the model's own kinds, commits) a violation.
    pub(super) fn violate(&mut self, violation: ScriptedViolation, now_ns: u64) {
        let faults = &self.live.faults;
        if faults.violations.len() + faults.header_lies.len() >= MAX_ARMED {
            warn!("{MAX_ARMED} violations armed already; {violation:?} ignored");
            return;
        }
        match violation {
            ScriptedViolation::Header(lie) => self.live.faults.header_lies.push_back(lie),
            ScriptedViolation::Config(lie) => {
                warn!("scripted violation: configuration space shows an impossible {lie:?}");
                self.kept.config_lie = Some(lie);
                self.live.settings_changed = true;
            }
            ScriptedViolation::UnknownEvent => {
                warn!("scripted violation: event of undefined kind {UNKNOWN_EVENT_KIND:#x}");
                self.push_event(UNKNOWN_EVENT_KIND, now_ns, 0, 0);
            }
            ScriptedViolation::NoInterrupts(duration) => {
                // Real time, as interrupt coalescing (deterministic mode's `now` is virtual).
                let real = self.real_time_ns(now_ns);
                self.live.faults.no_interrupts_until_ns = real.saturating_add(duration);
            }
            ScriptedViolation::InterruptStorm(count) => {
                self.live.faults.interrupt_storm =
                    self.live.faults.interrupt_storm.saturating_add(count)
            }
            other => self.live.faults.violations.push_back(other),
        }
        self.live.counters.violations_armed += 1;
    }

    /// Takes the oldest armed violation that `wanted` selects (the backend's kinds).
    pub fn take_violation(
        &mut self,
        wanted: impl Fn(&ScriptedViolation) -> bool,
    ) -> Option<ScriptedViolation> {
        let index = self.live.faults.violations.iter().position(wanted)?;
        self.live.faults.violations.remove(index)
    }

    /// Interrupts a storm still owes (taken by the call).
    pub fn take_interrupt_storm(&mut self) -> u32 {
        std::mem::take(&mut self.live.faults.interrupt_storm)
    }

    /// Gives back the interrupts of a storm not sent yet.
    pub fn owe_interrupt_storm(&mut self, count: u32) {
        self.live.faults.interrupt_storm = self.live.faults.interrupt_storm.saturating_add(count);
    }

    /// Whether a storm still owes interrupts (the clock must keep ticking).
    pub fn storm_pending(&self) -> bool {
        self.live.faults.interrupt_storm > 0
    }

    /// Whether used-buffer interrupts are withheld at `real_now_ns` (`no_interrupts`).
    pub fn interrupts_withheld(&self, real_now_ns: u64) -> bool {
        real_now_ns < self.live.faults.no_interrupts_until_ns
    }

    /// Makes `header` lie as the oldest armed `bad_header` says (a buffer with frames).
    pub(super) fn apply_header_lie(&mut self, header: &mut BufferHeader) {
        let Some(lie) = self.live.faults.header_lies.pop_front() else {
            return;
        };
        warn!(
            "scripted violation: buffer {} lies about {lie:?}",
            header.sequence.get()
        );
        match lie {
            HeaderLie::FrameCount => header.frame_count.set(header.frame_count.get() + 1),
            HeaderLie::Channels => header.channels.set(header.channels.get() + 1),
            HeaderLie::Format => {
                // Another defined format (of the same sample size where there is one), so
                // only the configuration contradicts it.
                use vdaq_wire::SampleFormat::{F32, S32};
                header.format = if header.format == S32 as u8 {
                    F32 as u8
                } else {
                    S32 as u8
                }
            }
            HeaderLie::Sequence => header.sequence.set(header.sequence.get() + 1),
            HeaderLie::FirstFrame => header.first_frame.set(header.first_frame.get() + 1),
            HeaderLie::Timestamp => header.timestamp_ns.set(0),
        }
    }

    /// Makes `config` show the impossible value a `bad_config` armed, if any.
    pub(super) fn apply_config_lie(&self, config: &mut DaqConfig) {
        let Some(lie) = self.kept.config_lie else {
            return;
        };
        match lie {
            ConfigLie::Channels => config.channels.set(0),
            ConfigLie::MaxChannels => config.max_channels.set(vdaq_wire::MAX_CHANNELS + 1),
            ConfigLie::Format => config.format = 0xee,
            ConfigLie::Rate => {
                config
                    .min_rate_hz
                    .set(config.max_rate_hz.get().saturating_add(1));
            }
            ConfigLie::Fifo => config.fifo_frames.set(0),
            ConfigLie::Firmware => config
                .firmware_version
                .set(config.firmware_version.get() + (1 << 16)),
            ConfigLie::Model => config.model[0] = 0x07,
            ConfigLie::State => config.state = 0xee,
        }
    }
}
