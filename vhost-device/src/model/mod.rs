//! The acquisition card itself, stage by stage: the sample clock makes frames, the FIFO holds
//! them, the completer moves them into posted buffers and hands completed buffers back, the
//! trigger watches the stream, the scripted-fault timeline bends all of it, and commands and
//! the configuration space are the driver's view.
//!
//! Nothing here knows about vhost-user or virtqueues. Time comes in as an argument (device
//! clock in ns), buffers come in through the [`ReadBuffer`] trait, and completed buffers go
//! out as [`Completion`]s, so every behaviour can be unit-tested with plain byte vectors and a
//! fake clock.
//!
//! | file | stage |
//! |---|---|
//! | `settings.rs` | what CONFIGURE sets, the power-on defaults, the card's limits |
//! | `clock.rs` | the sample clock: paced, free-running and deterministic (virtual) time |
//! | `fifo.rs` | the FIFO: accepting frames, overruns, the watermark and latency drain |
//! | `completer.rs` | posted buffers: filling, completing, interrupt coalescing |
//! | `trigger.rs` | software and level/edge triggers |
//! | `signal_changes.rs` | signal changes mid-stream and the file source |
//! | `faults.rs` | the scenario timeline and scripted faults |
//! | `violations.rs` | the card breaking the protocol on purpose |
//! | `events.rs` | the event backlog and NEEDS_RESET |
//! | `commands.rs` | control commands, STATUS and the configuration space |

mod clock;
mod commands;
mod completer;
mod events;
mod faults;
mod fifo;
pub mod scenario;
mod settings;
pub mod signal;
mod signal_changes;
pub mod source;
mod trigger;
pub mod violations;

use std::collections::VecDeque;

use thiserror::Error;
use vdaq_wire::buffer::BufferHeader;
use vdaq_wire::event::Event;
use vdaq_wire::DeviceState;

pub use commands::CommandReply;
pub use settings::{Limits, Settings, SettingsError};

use clock::Clock;
use completer::Buffers;
use faults::Faults;
use fifo::Fifo;
use scenario::{Scenario, Timeline};
use signal::SignalParams;
use trigger::Triggers;

const NS_PER_SEC: u128 = 1_000_000_000;

/// Frames are rendered through a scratch block of this size before being copied into guest
/// memory, so generation runs in cache and the copy is a single memcpy per block. It holds at
/// least one frame of the largest kind (1024 channels × 4 bytes; see `Limits::max_channels`).
const RENDER_BLOCK_BYTES: usize = 32 * 1024;

/// Most channels a card can be built with (the spec's limit; a frame fits the render block).
pub const MAX_CHANNELS_LIMIT: u16 = vdaq_wire::MAX_CHANNELS;
const _: () = assert!(MAX_CHANNELS_LIMIT as usize * 4 <= RENDER_BLOCK_BYTES);

/// A device-writable buffer the driver posted on the data queue.
pub trait ReadBuffer {
    /// Bytes available for samples after the header.
    fn payload_capacity(&self) -> usize;
    /// Writes `data` at `offset` bytes into the payload area.
    fn write_payload(&mut self, offset: usize, data: &[u8]) -> Result<(), BufferWriteError>;
    /// Writes the header at the start of the buffer.
    fn write_header(&mut self, header: &BufferHeader) -> Result<(), BufferWriteError>;
}

/// A write into a guest buffer failed (the buffer's memory went away or was never valid).
#[derive(Debug, Error, PartialEq, Eq)]
#[error("guest buffer write of {len} bytes at offset {offset} failed")]
pub struct BufferWriteError {
    /// Byte offset in the buffer (header included).
    pub offset: usize,
    /// Bytes that were to be written.
    pub len: usize,
}

/// A buffer the device hands back, with the used length to report.
#[derive(Debug)]
pub struct Completion<B> {
    /// The buffer.
    pub buffer: B,
    /// Bytes written: header plus payload, or 0 if nothing valid could be written.
    pub used_len: u32,
}

/// Counters reported in the config space and STATUS replies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames sampled.
    pub frames_produced: u64,
    /// Frames in completed buffers.
    pub frames_delivered: u64,
    /// Frames lost to overrun.
    pub frames_dropped: u64,
    /// Buffers completed.
    pub buffers_completed: u64,
    /// Malformed requests rejected.
    pub requests_rejected: u64,
    /// Events lost to a full backlog.
    pub events_lost: u32,
    /// Interrupts a scenario made the device lose.
    pub interrupts_dropped: u64,
    /// Buffers a scenario corrupted.
    pub buffers_corrupted: u64,
    /// Protocol violations a scenario or the control socket armed (`violations.rs`).
    pub violations_armed: u64,
}

/// The acquisition card: what survives a device reset, and the state a reset returns to
/// power-on. A reset replaces the live state whole, so no field can be forgotten.
pub struct Card<B> {
    kept: Kept,
    live: Live<B>,
}

/// What the card keeps across a device reset: how it was built and what the transport
/// negotiated.
struct Kept {
    /// Power-on settings.
    defaults: Settings,
    limits: Limits,
    /// VIRTIO_DAQ_F_CRC32 negotiated.
    crc_enabled: bool,
    /// VIRTIO_DAQ_F_TRIGGER negotiated.
    trigger_enabled: bool,
    /// Virtual sample time (see [`Card::set_deterministic`]).
    deterministic: bool,
    /// The scripted firmware behaviour, if a scenario is loaded (its timeline restarts at
    /// every reset).
    scenario: Option<Scenario>,
    /// Samples for the `File` signal.
    source: Option<std::sync::Arc<source::FileSource>>,
    /// Render block (see [`RENDER_BLOCK_BYTES`]).
    scratch: Vec<u8>,
    /// An impossible configuration-space value shown from a `bad_config` on, across resets
    /// (a card whose firmware is broken stays broken).
    config_lie: Option<violations::ConfigLie>,
}

/// The card's state from power-on (or reset) on, stage by stage.
struct Live<B> {
    /// Current settings (CONFIGURE, `set_signal`, control-socket adjustments).
    settings: Settings,
    state: DeviceState,
    /// Fault code shown in the config space while in NEEDS_RESET.
    fault_code: u32,
    counters: Counters,
    clock: Clock,
    fifo: Fifo,
    buffers: Buffers<B>,
    trigger: Triggers,
    faults: Faults,
    /// Signal changes made while streaming (`set_signal`): frames from each start index on
    /// carry that segment's signal. Empty: every frame carries the current settings' signal.
    signal_segments: VecDeque<(u64, SignalParams)>,
    /// Events waiting for an event-queue buffer.
    events: VecDeque<Event>,
    /// Settings changed other than by the driver's own CONFIGURE (`set_signal`, the control
    /// socket): the driver must be told with a configuration-change notification.
    settings_changed: bool,
}

impl<B> Live<B> {
    /// The state at power-on with `defaults`; a loaded scenario's timeline starts over.
    fn power_on(defaults: Settings, scenario: Option<&Scenario>) -> Self {
        Live {
            settings: defaults,
            state: DeviceState::Stopped,
            fault_code: 0,
            counters: Counters::default(),
            clock: Clock::default(),
            fifo: Fifo::default(),
            buffers: Buffers::default(),
            trigger: Triggers::default(),
            faults: Faults {
                timeline: scenario.map(Timeline::new),
                ..Faults::default()
            },
            signal_segments: VecDeque::new(),
            events: VecDeque::new(),
            settings_changed: false,
        }
    }
}

impl<B> std::fmt::Debug for Card<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Card")
            .field("settings", &self.live.settings)
            .field("state", &self.live.state)
            .field("next_frame", &self.live.clock.next_frame)
            .field("fifo_level", &self.live.fifo.level)
            .field("posted", &self.live.buffers.posted.len())
            .field("counters", &self.live.counters)
            .finish()
    }
}

impl<B: ReadBuffer> Card<B> {
    /// A stopped card with power-on `defaults`, which must satisfy `limits`.
    pub fn new(defaults: Settings, limits: Limits) -> Result<Self, SettingsError> {
        defaults.validate(&limits)?;
        Ok(Card {
            kept: Kept {
                defaults,
                limits,
                crc_enabled: false,
                trigger_enabled: false,
                deterministic: false,
                scenario: None,
                source: None,
                scratch: vec![0; RENDER_BLOCK_BYTES],
                config_lie: None,
            },
            live: Live::power_on(defaults, None),
        })
    }

    /// Current settings.
    pub fn settings(&self) -> &Settings {
        &self.live.settings
    }

    /// Current state.
    pub fn state(&self) -> DeviceState {
        self.live.state
    }

    /// Counters since reset.
    pub fn counters(&self) -> Counters {
        self.live.counters
    }

    /// Read buffers the device holds.
    pub fn buffers_held(&self) -> usize {
        self.live.buffers.posted.len()
    }

    /// Frames sampled but not yet in a completed buffer.
    pub fn frames_pending(&self) -> u64 {
        // Buffers fill strictly in order, so only the front one can be partly filled.
        self.live.fifo.level + self.live.buffers.posted.front().map_or(0, |p| p.filled)
    }

    /// Whether the driver negotiated VIRTIO_DAQ_F_CRC32.
    pub fn set_crc_enabled(&mut self, enabled: bool) {
        self.kept.crc_enabled = enabled;
    }

    /// Whether the driver negotiated VIRTIO_DAQ_F_TRIGGER (the TRIGGER command).
    pub fn set_trigger_enabled(&mut self, enabled: bool) {
        self.kept.trigger_enabled = enabled;
    }

    /// Counts a malformed request the transport layer rejected.
    pub fn count_rejected(&mut self) {
        self.live.counters.requests_rejected += 1;
    }

    /// Whether the device wants periodic [`Card::advance`] calls (clock running, or work
    /// waiting for a deadline).
    pub fn wants_ticks(&self) -> bool {
        self.live.state == DeviceState::Running
            || self.live.buffers.unsignaled > 0
            || self.frames_pending() > 0
    }

    /// The real device time at `now_ns`: `now_ns` itself, except in deterministic mode,
    /// where `now_ns` inside the sampling loop is virtual time.
    fn real_time_ns(&self, now_ns: u64) -> u64 {
        if self.kept.deterministic {
            self.live.clock.real_now_ns
        } else {
            now_ns
        }
    }

    fn frame_bytes(&self) -> usize {
        self.live.settings.format.sample_bytes() * usize::from(self.live.settings.channels)
    }

    fn latency_ns(&self) -> u64 {
        u64::from(self.live.settings.latency_us) * 1000
    }

    /// Device reset: back to power-on settings. Returns the buffers the device held (the
    /// driver has reset its queues, so they are not completed). Frames sampled but never
    /// delivered are logged as lost with the final accounting.
    pub fn reset(&mut self) -> Vec<B> {
        let c = self.live.counters;
        let pending = self.frames_pending();
        if c.frames_produced > 0 || !self.live.buffers.posted.is_empty() {
            log::info!(
                "device reset: produced {} = delivered {} + dropped {} + discarded at reset {}; \
                 {} buffers held were released",
                c.frames_produced,
                c.frames_delivered,
                c.frames_dropped,
                pending,
                self.live.buffers.posted.len()
            );
        }
        let held = self
            .live
            .buffers
            .posted
            .drain(..)
            .map(|p| p.buffer)
            .collect();
        self.live = Live::power_on(self.kept.defaults, self.kept.scenario.as_ref());
        held
    }
}

#[cfg(test)]
mod tests;
