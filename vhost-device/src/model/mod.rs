//! The acquisition card itself: sample clock, FIFO, completer, triggers, events and commands.
//!
//! Nothing here knows about vhost-user or virtqueues. Time comes in as an argument (device
//! clock in ns), buffers come in through the [`ReadBuffer`] trait, and completed buffers go
//! out as [`Completion`]s, so every behaviour can be unit-tested with plain byte vectors and a
//! fake clock.

pub mod scenario;
pub mod signal;
pub mod source;

use std::collections::VecDeque;

use log::{debug, warn};
use thiserror::Error;
use vdaq_wire::buffer::{flags, status as buffer_status, BufferHeader, HEADER_SIZE};
use vdaq_wire::config::{DaqConfig, MODEL_LEN};
use vdaq_wire::control::{self, opcode, Configure, FlushReply, Status};
use vdaq_wire::event::{kind, Event, EVENT_BACKLOG};
use vdaq_wire::zerocopy::{FromBytes, IntoBytes};
use vdaq_wire::{ClockMode, DeviceState, SampleFormat, SignalKind};

use scenario::{Action, Scenario, Timeline};
use signal::SignalParams;

const NS_PER_SEC: u128 = 1_000_000_000;

/// Frames are rendered through a scratch block of this size before being copied into guest
/// memory, so generation runs in cache and the copy is a single memcpy per block. It holds at
/// least one frame of the largest kind (1024 channels × 4 bytes; see `Limits::max_channels`).
const RENDER_BLOCK_BYTES: usize = 32 * 1024;

/// Most channels a card can be built with (keeps a frame within the render block).
pub const MAX_CHANNELS_LIMIT: u16 = 1024;

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

/// Acquisition settings (what CONFIGURE sets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Paced sample rate (Hz).
    pub rate_hz: u32,
    /// Channels per frame.
    pub channels: u16,
    /// Sample encoding.
    pub format: SampleFormat,
    /// Waveform.
    pub signal: SignalKind,
    /// Frequency of periodic signals (mHz).
    pub signal_freq_mhz: u32,
    /// Amplitude in ‰ of full scale.
    pub amplitude_permille: u16,
    /// Noise seed.
    pub seed: u64,
    /// Paced or free-running.
    pub clock: ClockMode,
    /// Latency bound (µs).
    pub latency_us: u32,
    /// FIFO watermark (frames).
    pub watermark_frames: u32,
    /// Completions per notification.
    pub coalesce_buffers: u16,
}

/// Fixed properties of the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most channels per frame.
    pub max_channels: u16,
    /// Lowest paced rate (Hz).
    pub min_rate_hz: u32,
    /// Highest paced rate (Hz).
    pub max_rate_hz: u32,
    /// FIFO depth (frames).
    pub fifo_frames: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_channels: 64,
            min_rate_hz: 1,
            max_rate_hz: 100_000_000,
            fifo_frames: 65_536,
        }
    }
}

/// Why settings were refused (CONFIGURE answers INVALID; the CLI exits 2).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SettingsError {
    /// Rate outside the card's range.
    #[error("rate {rate} Hz is outside {min}..={max} Hz")]
    Rate {
        /// Requested.
        rate: u32,
        /// Lowest allowed.
        min: u32,
        /// Highest allowed.
        max: u32,
    },
    /// Channel count outside 1..=max.
    #[error("channel count {0} is outside 1..={1}")]
    Channels(u16, u16),
    /// Watermark outside 1..=FIFO depth.
    #[error("watermark {0} frames is outside 1..={1} (the FIFO depth)")]
    Watermark(u32, u32),
    /// Zero latency bound.
    #[error("latency bound must be at least 1 µs")]
    Latency,
    /// Zero coalescing count.
    #[error("interrupt coalescing must be at least 1 buffer")]
    Coalesce,
    /// Amplitude above full scale.
    #[error("amplitude {0}‰ exceeds 1000‰ (full scale)")]
    Amplitude(u16),
    /// Unknown sample format code.
    #[error("unknown sample format code {0}")]
    Format(u8),
    /// Unknown signal code.
    #[error("unknown signal code {0}")]
    Signal(u8),
    /// Unknown clock code.
    #[error("unknown clock mode code {0}")]
    Clock(u8),
}

impl Settings {
    /// Checks every field against `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<(), SettingsError> {
        if self.rate_hz < limits.min_rate_hz || self.rate_hz > limits.max_rate_hz {
            return Err(SettingsError::Rate {
                rate: self.rate_hz,
                min: limits.min_rate_hz,
                max: limits.max_rate_hz,
            });
        }
        if self.channels == 0 || self.channels > limits.max_channels.min(MAX_CHANNELS_LIMIT) {
            return Err(SettingsError::Channels(self.channels, limits.max_channels));
        }
        if self.watermark_frames == 0 || self.watermark_frames > limits.fifo_frames {
            return Err(SettingsError::Watermark(
                self.watermark_frames,
                limits.fifo_frames,
            ));
        }
        if self.latency_us == 0 {
            return Err(SettingsError::Latency);
        }
        if self.coalesce_buffers == 0 {
            return Err(SettingsError::Coalesce);
        }
        if self.amplitude_permille > 1000 {
            return Err(SettingsError::Amplitude(self.amplitude_permille));
        }
        Ok(())
    }

    /// Decodes a CONFIGURE payload.
    pub fn from_wire(cfg: &Configure) -> Result<Self, SettingsError> {
        Ok(Settings {
            rate_hz: cfg.rate_hz.get(),
            channels: cfg.channels.get(),
            format: SampleFormat::from_code(cfg.format).ok_or(SettingsError::Format(cfg.format))?,
            signal: SignalKind::from_code(cfg.signal).ok_or(SettingsError::Signal(cfg.signal))?,
            signal_freq_mhz: cfg.signal_freq_mhz.get(),
            amplitude_permille: cfg.amplitude_permille.get(),
            seed: cfg.seed.get(),
            clock: ClockMode::from_code(cfg.clock).ok_or(SettingsError::Clock(cfg.clock))?,
            latency_us: cfg.latency_us.get(),
            watermark_frames: cfg.watermark_frames.get(),
            coalesce_buffers: cfg.coalesce_buffers.get(),
        })
    }

    /// Encodes as a CONFIGURE payload.
    pub fn to_wire(&self) -> Configure {
        Configure {
            rate_hz: self.rate_hz.into(),
            latency_us: self.latency_us.into(),
            watermark_frames: self.watermark_frames.into(),
            signal_freq_mhz: self.signal_freq_mhz.into(),
            channels: self.channels.into(),
            coalesce_buffers: self.coalesce_buffers.into(),
            amplitude_permille: self.amplitude_permille.into(),
            format: self.format as u8,
            signal: self.signal as u8,
            seed: self.seed.into(),
            clock: self.clock as u8,
            reserved: [0; 7],
        }
    }

    fn signal_params(&self) -> SignalParams {
        SignalParams {
            kind: self.signal,
            format: self.format,
            channels: self.channels,
            rate_hz: match self.clock {
                ClockMode::Paced => self.rate_hz,
                ClockMode::FreeRunning => 0,
            },
            freq_mhz: self.signal_freq_mhz,
            amplitude_permille: self.amplitude_permille,
            seed: self.seed,
        }
    }
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
}

/// The armed level/edge trigger (SET_TRIGGER).
#[derive(Clone, Copy, Debug, PartialEq)]
struct HwTrigger {
    mode: u8,
    channel: u16,
    threshold: f64,
    post_frames: u64,
}

/// Where the trigger evaluation stands across blocks.
#[derive(Clone, Copy, Debug, Default)]
struct TriggerState {
    /// Value of the watched channel in the last frame evaluated.
    previous: Option<f64>,
    /// The trigger re-arms at this frame (after the last window).
    rearm_frame: u64,
}

/// Evaluates `trigger` on `block` (frames from `first_frame`); returns the frames it fires at.
fn scan_trigger(
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

/// Contiguous frames in the FIFO, sampled in one clock run (START to STOP). A gap between
/// two runs is an overrun; a new clock origin is a pause.
#[derive(Clone, Copy, Debug)]
struct Run {
    first: u64,
    len: u64,
    /// Clock run the frames belong to: frame `origin_frame` was sampled at `origin_ns`.
    origin_ns: u64,
    origin_frame: u64,
}

/// A posted buffer and what the device has put in it so far.
struct Posted<B> {
    buffer: B,
    /// Signal of the frames in the buffer (set when the first frame goes in).
    signal: SignalKind,
    /// Clock origin of the frames in the buffer (frames of one buffer share one clock run).
    origin_ns: u64,
    capacity_frames: u64,
    filled: u64,
    first_frame: u64,
    timestamp_ns: u64,
    dropped_before: u64,
    flags: u16,
    trigger_frame: u32,
    crc: crc32fast::Hasher,
}

/// Outcome of a control command: status code and reply payload.
#[derive(Debug, PartialEq, Eq)]
pub struct CommandReply {
    /// [`control::status`] code.
    pub status: u32,
    /// Reply payload (empty unless the opcode has one and status is OK).
    pub payload: Vec<u8>,
}

impl CommandReply {
    fn status(status: u32) -> Self {
        CommandReply {
            status,
            payload: Vec::new(),
        }
    }
}

/// The acquisition card.
pub struct Card<B> {
    defaults: Settings,
    settings: Settings,
    limits: Limits,
    crc_enabled: bool,
    trigger_enabled: bool,
    state: DeviceState,
    fault_code: u32,
    /// Paced clock anchor: frame `origin_frame` was sampled at `origin_ns`.
    origin_ns: u64,
    origin_frame: u64,
    /// Stream index of the next frame to sample.
    next_frame: u64,
    /// Stream index right after the last frame put into a buffer.
    delivered_end: u64,
    fifo: VecDeque<Run>,
    fifo_level: u64,
    /// Frames dropped in the overrun episode still going on: (first, count).
    drop_run: Option<(u64, u64)>,
    posted: VecDeque<Posted<B>>,
    sequence: u64,
    counters: Counters,
    events: VecDeque<Event>,
    trigger_at: Option<u64>,
    discontinuity: bool,
    unsignaled: u32,
    first_unsignaled_ns: Option<u64>,
    scratch: Vec<u8>,
    /// The scripted firmware behaviour, if a scenario is loaded.
    scenario: Option<Scenario>,
    timeline: Option<Timeline>,
    /// Device time of the first START since reset (scenario time zero).
    stream_started_ns: Option<u64>,
    /// Interrupts still to lose.
    drop_interrupts: u32,
    /// No FIFO drain before this device time.
    stall_until_ns: u64,
    /// Buffers still to corrupt.
    corrupt_buffers: u32,
    disconnect_requested: bool,
    /// Deterministic mode: virtual sample time (see [`Card::set_deterministic`]).
    deterministic: bool,
    /// Deterministic mode: frames up to this index are sampled while the FIFO is not drained.
    stall_until_frame: u64,
    /// Samples for the `File` signal.
    source: Option<std::sync::Arc<source::FileSource>>,
    /// Completed buffers are held back until this device time (scripted).
    delay_completions_until_ns: u64,
    /// Latest real device time seen by `advance` (deterministic mode keeps virtual time
    /// apart from it).
    real_now_ns: u64,
    /// Signal changes made while streaming (`set_signal`): frames from each start index on
    /// carry that segment's signal. Empty: every frame carries the current settings' signal.
    signal_segments: VecDeque<(u64, SignalParams)>,
    /// The armed level/edge trigger.
    hw_trigger: Option<HwTrigger>,
    hw_trigger_state: TriggerState,
}

impl<B> std::fmt::Debug for Card<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Card")
            .field("settings", &self.settings)
            .field("state", &self.state)
            .field("next_frame", &self.next_frame)
            .field("fifo_level", &self.fifo_level)
            .field("posted", &self.posted.len())
            .field("counters", &self.counters)
            .finish()
    }
}

impl<B: ReadBuffer> Card<B> {
    /// A stopped card with power-on `defaults`, which must satisfy `limits`.
    pub fn new(defaults: Settings, limits: Limits) -> Result<Self, SettingsError> {
        defaults.validate(&limits)?;
        Ok(Card {
            scratch: vec![0; RENDER_BLOCK_BYTES],
            ..Card::new_unchecked(defaults, limits)
        })
    }

    /// Current settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Current state.
    pub fn state(&self) -> DeviceState {
        self.state
    }

    /// Counters since reset.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Read buffers the device holds.
    pub fn buffers_held(&self) -> usize {
        self.posted.len()
    }

    /// Frames sampled but not yet in a completed buffer.
    pub fn frames_pending(&self) -> u64 {
        // Buffers fill strictly in order, so only the front one can be partly filled.
        self.fifo_level + self.posted.front().map_or(0, |p| p.filled)
    }

    /// Whether the driver negotiated VIRTIO_DAQ_F_CRC32.
    pub fn set_crc_enabled(&mut self, enabled: bool) {
        self.crc_enabled = enabled;
    }

    /// Whether the driver negotiated VIRTIO_DAQ_F_TRIGGER (the TRIGGER command).
    pub fn set_trigger_enabled(&mut self, enabled: bool) {
        self.trigger_enabled = enabled;
    }

    /// Counts an event that could not be delivered.
    pub fn count_event_lost(&mut self) {
        self.counters.events_lost += 1;
    }

    /// Counts a malformed request the transport layer rejected.
    pub fn count_rejected(&mut self) {
        self.counters.requests_rejected += 1;
    }

    /// Whether the device wants periodic [`Card::advance`] calls (clock running, or work
    /// waiting for a deadline).
    pub fn wants_ticks(&self) -> bool {
        self.state == DeviceState::Running || self.unsignaled > 0 || self.frames_pending() > 0
    }

    /// Accepts a posted buffer. A buffer too small for one frame is returned at once with a
    /// BAD_BUFFER header.
    pub fn post(&mut self, buffer: B, now_ns: u64, out: &mut Vec<Completion<B>>) {
        let frame_bytes = self.frame_bytes() as u64;
        let capacity_frames = buffer.payload_capacity() as u64 / frame_bytes;
        if capacity_frames == 0 {
            self.reject_buffer(buffer, now_ns, out);
            return;
        }
        self.posted.push_back(Posted {
            buffer,
            signal: self.settings.signal,
            origin_ns: 0,
            capacity_frames: capacity_frames.min(u64::from(u32::MAX)),
            filled: 0,
            first_frame: 0,
            timestamp_ns: 0,
            dropped_before: 0,
            flags: 0,
            trigger_frame: 0,
            crc: crc32fast::Hasher::new(),
        });
    }

    /// Answers a buffer that cannot hold a single frame: header with BAD_BUFFER, no frames.
    fn reject_buffer(&mut self, mut buffer: B, now_ns: u64, out: &mut Vec<Completion<B>>) {
        self.counters.requests_rejected += 1;
        let header = BufferHeader {
            timestamp_ns: now_ns.into(),
            status: buffer_status::BAD_BUFFER,
            format: self.settings.format as u8,
            channels: self.settings.channels.into(),
            ..Default::default()
        };
        let used_len = match buffer.write_header(&header) {
            Ok(()) => HEADER_SIZE as u32,
            Err(_) => 0,
        };
        self.note_completion(now_ns);
        out.push(Completion { buffer, used_len });
    }

    /// Moves the card forward to `now_ns`: samples due frames, fills and completes buffers.
    pub fn advance(&mut self, now_ns: u64, out: &mut Vec<Completion<B>>) {
        self.real_now_ns = now_ns;
        match self.state {
            DeviceState::NeedsReset => return,
            DeviceState::Stopped => {
                // A stopped card still hands over what it sampled before STOP, and completes
                // the buffer that takes the last of it.
                self.drain(now_ns, true, out);
                if self.fifo_level == 0 && self.posted.front().is_some_and(|p| p.filled > 0) {
                    self.complete_front(flags::STOPPED, now_ns, out);
                }
                return;
            }
            DeviceState::Running => {}
        }
        if self.deterministic && self.settings.clock == ClockMode::Paced {
            self.run_virtual(out);
            return;
        }
        self.run_timeline(now_ns);
        if self.state != DeviceState::Running {
            return;
        }
        match self.settings.clock {
            ClockMode::Paced => {
                let due = self.due_frame(now_ns);
                self.produce_until(due, now_ns, out);
                self.drain(now_ns, false, out);
                self.complete_expired(now_ns, out);
            }
            ClockMode::FreeRunning => self.free_run(now_ns, out),
        }
    }

    /// Frame the paced clock has reached at `now_ns` (exclusive).
    fn due_frame(&self, now_ns: u64) -> u64 {
        let elapsed = u128::from(now_ns.saturating_sub(self.origin_ns));
        let frames = elapsed * u128::from(self.settings.rate_hz) / NS_PER_SEC;
        self.origin_frame
            .saturating_add(u64::try_from(frames).unwrap_or(u64::MAX))
    }

    /// Device time at which paced frame `frame` of `run` was sampled.
    fn frame_time_ns(&self, run: &Run, frame: u64) -> u64 {
        if self.settings.clock == ClockMode::FreeRunning || self.settings.rate_hz == 0 {
            return run.origin_ns;
        }
        let offset = u128::from(frame.saturating_sub(run.origin_frame)) * NS_PER_SEC
            / u128::from(self.settings.rate_hz);
        run.origin_ns
            .saturating_add(u64::try_from(offset).unwrap_or(u64::MAX))
    }

    fn produce_until(&mut self, due: u64, now_ns: u64, out: &mut Vec<Completion<B>>) {
        let depth = u64::from(self.limits.fifo_frames);
        while self.next_frame < due {
            let wanted = due - self.next_frame;
            let mut space = depth - self.fifo_level;
            if space == 0 {
                // Like a DMA engine, move data out before declaring an overrun.
                self.drain(now_ns, false, out);
                space = depth - self.fifo_level;
                if space == 0 {
                    self.drop_frames(wanted, now_ns);
                    break;
                }
            }
            self.accept_frames(wanted.min(space), now_ns);
        }
    }

    fn accept_frames(&mut self, count: u64, now_ns: u64) {
        self.end_overrun(now_ns);
        let first = self.next_frame;
        let origin_ns = self.origin_ns;
        match self.fifo.back_mut() {
            Some(run) if run.first + run.len == first && run.origin_ns == origin_ns => {
                run.len += count
            }
            _ => self.fifo.push_back(Run {
                first,
                len: count,
                origin_ns,
                origin_frame: self.origin_frame,
            }),
        }
        self.fifo_level += count;
        self.next_frame += count;
        self.counters.frames_produced += count;
    }

    fn drop_frames(&mut self, count: u64, now_ns: u64) {
        let first = self.next_frame;
        match &mut self.drop_run {
            Some((_, dropped)) => *dropped += count,
            None => {
                debug!("overrun: FIFO full and no buffer posted, dropping from frame {first}");
                self.drop_run = Some((first, count));
            }
        }
        if let Some(trigger) = self.trigger_at {
            if trigger >= first && trigger < first + count {
                self.trigger_at = None;
                self.push_event(kind::TRIGGER, now_ns, trigger, u64::MAX);
            }
        }
        self.next_frame += count;
        self.counters.frames_produced += count;
        self.counters.frames_dropped += count;
    }

    /// Closes the running overrun episode, if any, and reports it.
    fn end_overrun(&mut self, now_ns: u64) {
        if let Some((first, count)) = self.drop_run.take() {
            self.push_event(kind::OVERRUN, now_ns, count, first);
        }
    }

    /// Moves FIFO frames into posted buffers. Without `force`, only once the FIFO reached the
    /// watermark or its oldest frame is about to exceed the latency bound.
    fn drain(&mut self, now_ns: u64, force: bool, out: &mut Vec<Completion<B>>) {
        if !force && now_ns < self.stall_until_ns {
            // A scripted stall: the DMA engine moves nothing.
            return;
        }
        while self.fifo_level > 0 && !self.posted.is_empty() {
            if !force
                && self.fifo_level < u64::from(self.settings.watermark_frames)
                && !self.oldest_fifo_frame_expired(now_ns)
            {
                break;
            }
            let Some(run) = self.fifo.front().copied() else {
                break;
            };
            let needs_gap_completion = self.posted.front().is_some_and(|p| {
                p.filled > 0
                    && (p.first_frame + p.filled != run.first || p.origin_ns != run.origin_ns)
            });
            if needs_gap_completion {
                // Frames in one buffer are contiguous in index and time: an overrun gap or a
                // STOP/START pause ends the buffer.
                self.complete_front(0, now_ns, out);
                continue;
            }
            let taken = self.fill_front(&run, run.len, now_ns, out);
            self.fifo_level -= taken;
            if let Some(front) = self.fifo.front_mut() {
                front.first += taken;
                front.len -= taken;
                if front.len == 0 {
                    self.fifo.pop_front();
                }
            }
        }
    }

    fn oldest_fifo_frame_expired(&self, now_ns: u64) -> bool {
        self.fifo
            .front()
            .is_some_and(|run| now_ns >= self.frame_time_ns(run, run.first) + self.latency_ns() / 2)
    }

    fn latency_ns(&self) -> u64 {
        u64::from(self.settings.latency_us) * 1000
    }

    /// Completes the front buffer if it holds frames older than the latency bound.
    fn complete_expired(&mut self, now_ns: u64, out: &mut Vec<Completion<B>>) {
        let latency = self.latency_ns();
        while let Some(front) = self.posted.front() {
            if front.filled > 0 && now_ns >= front.timestamp_ns.saturating_add(latency) {
                self.complete_front(flags::LATENCY, now_ns, out);
            } else {
                break;
            }
        }
    }

    /// Free-running clock: every posted buffer is filled with fresh frames right away.
    fn free_run(&mut self, now_ns: u64, out: &mut Vec<Completion<B>>) {
        if now_ns < self.stall_until_ns {
            return;
        }
        while let Some(front) = self.posted.front() {
            let mut count = front.capacity_frames - front.filled;
            // Frame-keyed scenario steps fire at their exact frame.
            if let Some(step) = self.timeline.as_ref().and_then(Timeline::next_frame_step) {
                if step <= self.next_frame {
                    self.run_timeline(now_ns);
                    if self.state != DeviceState::Running || now_ns < self.stall_until_ns {
                        return;
                    }
                    continue;
                }
                count = count.min(step - self.next_frame);
            }
            let run = Run {
                first: self.next_frame,
                len: count,
                origin_ns: now_ns,
                origin_frame: self.next_frame,
            };
            let taken = self.fill_front(&run, count, now_ns, out);
            self.next_frame += taken;
            self.counters.frames_produced += taken;
        }
    }

    /// Renders up to `count` frames from the start of `run` into the front buffer; completes
    /// it when full. Returns the frames taken.
    fn fill_front(
        &mut self,
        run: &Run,
        count: u64,
        now_ns: u64,
        out: &mut Vec<Completion<B>>,
    ) -> u64 {
        let first = run.first;
        // Frames of one buffer share one signal: a change ends the buffer being filled.
        if self.signal_changes_at(first)
            && self
                .posted
                .front()
                .is_some_and(|p| p.filled > 0 && p.first_frame < first)
        {
            self.complete_front(0, now_ns, out);
            return 0;
        }
        let count = match self.signal_change_after(first) {
            Some(change) if change < first + count => change - first,
            _ => count,
        };
        let signal_changed_here = self.signal_changes_at(first);
        // Segments fully behind the delivered stream are no longer needed.
        while self.signal_segments.len() > 1 && self.signal_segments[1].0 <= self.delivered_end {
            self.signal_segments.pop_front();
        }
        let frame_bytes = self.frame_bytes();
        let params = self.signal_at(first);
        let crc_enabled = self.crc_enabled;
        let frame_time = self.frame_time_ns(run, first);
        let free_running = self.settings.clock == ClockMode::FreeRunning;
        let discontinuity = std::mem::take(&mut self.discontinuity);
        let delivered_end = self.delivered_end;
        let trigger_at = self.trigger_at;
        let Some(front) = self.posted.front_mut() else {
            return 0;
        };
        if front.filled == 0 {
            front.first_frame = first;
            front.signal = params.kind;
            front.origin_ns = run.origin_ns;
            front.timestamp_ns = if free_running { now_ns } else { frame_time };
            front.dropped_before = first.saturating_sub(delivered_end);
            if front.dropped_before > 0 {
                front.flags |= flags::OVERRUN;
            }
            if discontinuity || signal_changed_here {
                front.flags |= flags::DISCONTINUITY;
            }
        }
        let taken = count.min(front.capacity_frames - front.filled);
        let mut triggered = None;
        if let Some(trigger) = trigger_at {
            if trigger >= first && trigger < first + taken {
                // The header records the buffer's first trigger; every trigger raises an event.
                if front.flags & flags::TRIGGERED == 0 {
                    front.flags |= flags::TRIGGERED;
                    front.trigger_frame = (front.filled + trigger - first) as u32;
                }
                triggered = Some(trigger);
            }
        }
        let mut write_failed = false;
        // The S16 counter is periodic: its bytes come straight from the wire crate's table,
        // one copy into guest memory; other signals are rendered into the scratch block.
        let from_table = params.kind == SignalKind::Counter && params.format == SampleFormat::S16;
        let block_bytes = if from_table {
            2 * vdaq_wire::pattern::S16_PERIOD
        } else {
            self.scratch.len()
        };
        let frames_per_block = (block_bytes / frame_bytes).max(1) as u64;
        let channels = u64::from(params.channels);
        let mut hw_fired: Vec<u64> = Vec::new();
        let mut done = 0;
        while done < taken {
            let n = frames_per_block.min(taken - done);
            let bytes = n as usize * frame_bytes;
            let block: &[u8] = if from_table {
                vdaq_wire::pattern::s16_counter_window((first + done) * channels, bytes / 2)
            } else {
                let scratch = &mut self.scratch[..bytes];
                match (&self.source, params.kind) {
                    (Some(source), SignalKind::File) => {
                        source.render(params.format, first + done, scratch)
                    }
                    _ => params.render(first + done, scratch),
                }
                scratch
            };
            if let Some(trigger) = &self.hw_trigger {
                hw_fired.extend(scan_trigger(
                    trigger,
                    &mut self.hw_trigger_state,
                    params.format,
                    params.channels,
                    first + done,
                    block,
                ));
            }
            if crc_enabled {
                front.crc.update(block);
            }
            let offset = (front.filled + done) as usize * frame_bytes;
            if front.buffer.write_payload(offset, block).is_err() {
                write_failed = true;
                break;
            }
            done += n;
        }
        for &frame in &hw_fired {
            if front.flags & flags::TRIGGERED == 0 {
                front.flags |= flags::TRIGGERED;
                front.trigger_frame = (frame - front.first_frame) as u32;
            }
        }
        front.filled += taken;
        self.delivered_end = first + taken;
        for frame in hw_fired {
            self.push_event(kind::TRIGGER, now_ns, frame, self.sequence);
        }
        if let Some(trigger) = triggered {
            self.trigger_at = None;
            self.push_event(kind::TRIGGER, now_ns, trigger, self.sequence);
        }
        if write_failed {
            // The frames are gone: they count as dropped, the buffer is returned empty, and
            // the next buffer's header reports them in `dropped_frames`.
            if let Some(broken) = self.posted.pop_front() {
                // Back to before this buffer's drops too, so the next header reports them.
                self.delivered_end = broken.first_frame - broken.dropped_before;
                self.counters.frames_dropped += broken.filled;
                self.counters.requests_rejected += 1;
                warn!("read buffer became unwritable; returning it with used length 0");
                self.note_completion(now_ns);
                out.push(Completion {
                    buffer: broken.buffer,
                    used_len: 0,
                });
            }
            return taken;
        }
        let full = self
            .posted
            .front()
            .is_some_and(|p| p.filled == p.capacity_frames);
        if full {
            self.complete_front(0, now_ns, out);
        }
        taken
    }

    /// Completes the front buffer with what it holds.
    fn complete_front(&mut self, extra_flags: u16, now_ns: u64, out: &mut Vec<Completion<B>>) {
        let Some(mut posted) = self.posted.pop_front() else {
            return;
        };
        let frame_bytes = self.frame_bytes();
        if posted.filled == 0 {
            // Returned empty (flush/stop): it starts where the next delivered frame would, and
            // reports the frames dropped since the last delivered one, so every drop shows up
            // in some header as long as any buffer completes after it.
            posted.first_frame = self.fifo.front().map_or(self.next_frame, |run| run.first);
            posted.timestamp_ns = now_ns;
            posted.dropped_before = posted.first_frame.saturating_sub(self.delivered_end);
            if posted.dropped_before > 0 {
                posted.flags |= flags::OVERRUN;
            }
            self.delivered_end = posted.first_frame;
        }
        let mut header_flags = posted.flags | extra_flags;
        let mut crc = if self.crc_enabled {
            header_flags |= flags::CRC_VALID;
            posted.crc.clone().finalize()
        } else {
            0
        };
        if self.corrupt_buffers > 0 && posted.filled > 0 {
            // Scripted corruption: a CRC that does not match, or without CRC a wrong first
            // sample byte.
            self.corrupt_buffers -= 1;
            self.counters.buffers_corrupted += 1;
            if self.crc_enabled {
                crc ^= 0x5a5a_5a5a;
            } else {
                let mut first = vec![0u8; frame_bytes];
                self.settings
                    .signal_params()
                    .render(posted.first_frame, &mut first);
                let _ = posted.buffer.write_payload(0, &[first[0] ^ 0xff]);
            }
        }
        let header = BufferHeader {
            sequence: self.sequence.into(),
            first_frame: posted.first_frame.into(),
            timestamp_ns: posted.timestamp_ns.into(),
            dropped_frames: posted.dropped_before.into(),
            frame_count: (posted.filled as u32).into(),
            trigger_frame: posted.trigger_frame.into(),
            crc32: crc.into(),
            flags: header_flags.into(),
            status: buffer_status::OK,
            format: self.settings.format as u8,
            channels: self.settings.channels.into(),
            signal: posted.signal as u8,
            reserved0: 0,
            rate_hz: match self.settings.clock {
                ClockMode::Paced => self.settings.rate_hz,
                ClockMode::FreeRunning => 0,
            }
            .into(),
            reserved1: 0.into(),
        };
        let used_len = match posted.buffer.write_header(&header) {
            Ok(()) => HEADER_SIZE + posted.filled as usize * frame_bytes,
            Err(err) => {
                warn!("read buffer header write failed: {err}");
                self.counters.requests_rejected += 1;
                self.counters.frames_dropped += posted.filled;
                // The frames (and the drops before them) go into the next header.
                self.delivered_end = posted.first_frame - posted.dropped_before;
                self.note_completion(now_ns);
                out.push(Completion {
                    buffer: posted.buffer,
                    used_len: 0,
                });
                return;
            }
        };
        self.sequence += 1;
        self.counters.buffers_completed += 1;
        self.counters.frames_delivered += posted.filled;
        self.note_completion(now_ns);
        out.push(Completion {
            buffer: posted.buffer,
            used_len: u32::try_from(used_len).unwrap_or(u32::MAX),
        });
    }

    fn note_completion(&mut self, now_ns: u64) {
        self.unsignaled += 1;
        // Interrupt coalescing runs on real time, also in deterministic mode, where `now_ns`
        // inside the sampling loop is virtual.
        let real = if self.deterministic {
            self.real_now_ns
        } else {
            now_ns
        };
        self.first_unsignaled_ns.get_or_insert(real);
    }

    /// Whether to notify the driver now (interrupt coalescing): after `coalesce_buffers`
    /// completions, once the oldest unsignaled completion reached the latency bound, or at
    /// once with `force`. Resets the coalescing state when it says yes.
    pub fn take_notification(&mut self, now_ns: u64, force: bool) -> bool {
        if self.unsignaled == 0 {
            return false;
        }
        let due = force
            || self.unsignaled >= u32::from(self.settings.coalesce_buffers)
            || self
                .first_unsignaled_ns
                .is_some_and(|t| now_ns >= t.saturating_add(self.latency_ns()));
        if due {
            self.unsignaled = 0;
            self.first_unsignaled_ns = None;
            if self.drop_interrupts > 0 {
                // Scripted: this interrupt is lost.
                self.drop_interrupts -= 1;
                self.counters.interrupts_dropped += 1;
                return false;
            }
        }
        due
    }

    /// Next pending event, oldest first.
    pub fn pop_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether events wait for an event-queue buffer.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    fn push_event(&mut self, event_kind: u32, now_ns: u64, arg0: u64, arg1: u64) {
        if self.events.len() >= EVENT_BACKLOG {
            self.counters.events_lost += 1;
            return;
        }
        self.events.push_back(Event {
            kind: event_kind.into(),
            reserved: 0.into(),
            timestamp_ns: now_ns.into(),
            arg0: arg0.into(),
            arg1: arg1.into(),
        });
    }

    /// Enters NEEDS_RESET: the device stops and completes nothing until it is reset.
    pub fn enter_needs_reset(&mut self, fault_code: u32, now_ns: u64) {
        if self.state == DeviceState::NeedsReset {
            return;
        }
        warn!("device enters NEEDS_RESET (fault code {fault_code})");
        self.state = DeviceState::NeedsReset;
        self.fault_code = fault_code;
        self.push_event(kind::NEEDS_RESET, now_ns, u64::from(fault_code), 0);
    }

    /// Device reset: back to power-on settings. Returns the buffers the device held (the
    /// driver has reset its queues, so they are not completed). Frames sampled but never
    /// delivered are logged as lost with the final accounting.
    pub fn reset(&mut self) -> Vec<B> {
        let c = self.counters;
        let pending = self.frames_pending();
        if c.frames_produced > 0 || !self.posted.is_empty() {
            log::info!(
                "device reset: produced {} = delivered {} + dropped {} + discarded at reset {}; \
                 {} buffers held were released",
                c.frames_produced,
                c.frames_delivered,
                c.frames_dropped,
                pending,
                self.posted.len()
            );
        }
        let held = self.posted.drain(..).map(|p| p.buffer).collect();
        let crc_enabled = self.crc_enabled;
        let trigger_enabled = self.trigger_enabled;
        let deterministic = self.deterministic;
        let source = self.source.take();
        let scratch = std::mem::take(&mut self.scratch);
        let timeline = self.scenario.as_ref().map(Timeline::new);
        let scenario = self.scenario.take();
        *self = Card {
            scratch,
            crc_enabled,
            trigger_enabled,
            scenario,
            timeline,
            deterministic,
            source,
            ..Card::new_unchecked(self.defaults, self.limits)
        };
        held
    }

    fn new_unchecked(defaults: Settings, limits: Limits) -> Self {
        Card {
            defaults,
            settings: defaults,
            limits,
            crc_enabled: false,
            trigger_enabled: false,
            state: DeviceState::Stopped,
            fault_code: 0,
            origin_ns: 0,
            origin_frame: 0,
            next_frame: 0,
            delivered_end: 0,
            fifo: VecDeque::new(),
            fifo_level: 0,
            drop_run: None,
            posted: VecDeque::new(),
            sequence: 0,
            counters: Counters::default(),
            events: VecDeque::new(),
            trigger_at: None,
            discontinuity: false,
            unsignaled: 0,
            first_unsignaled_ns: None,
            scratch: Vec::new(),
            scenario: None,
            timeline: None,
            stream_started_ns: None,
            drop_interrupts: 0,
            stall_until_ns: 0,
            corrupt_buffers: 0,
            disconnect_requested: false,
            deterministic: false,
            stall_until_frame: 0,
            source: None,
            delay_completions_until_ns: 0,
            real_now_ns: 0,
            signal_segments: VecDeque::new(),
            hw_trigger: None,
            hw_trigger_state: TriggerState::default(),
        }
    }

    /// SET_TRIGGER: arms (or, with mode OFF, disarms) the level/edge trigger.
    pub fn set_trigger(&mut self, config: &vdaq_wire::control::TriggerConfig) -> u32 {
        use vdaq_wire::control::trigger_mode;
        if config.mode == trigger_mode::OFF {
            self.hw_trigger = None;
            return control::status::OK;
        }
        let threshold = config.threshold_ppm.get() as i32;
        if config.mode > trigger_mode::FALLING
            || config.channel.get() >= self.settings.channels
            || !(-1_000_000..=1_000_000).contains(&threshold)
            || config.post_frames.get() == 0
        {
            return control::status::INVALID;
        }
        self.hw_trigger = Some(HwTrigger {
            mode: config.mode,
            channel: config.channel.get(),
            threshold: f64::from(threshold) / 1e6,
            post_frames: u64::from(config.post_frames.get()),
        });
        self.hw_trigger_state = TriggerState::default();
        control::status::OK
    }

    /// Whether completed buffers must be held back at `now_ns` (a scripted delay).
    pub fn completions_delayed(&self, now_ns: u64) -> bool {
        now_ns < self.delay_completions_until_ns
    }

    /// Sets the samples the `File` signal replays.
    pub fn set_source(&mut self, source: std::sync::Arc<source::FileSource>) {
        self.source = Some(source);
    }

    /// The signal frame `frame` is sampled with.
    fn signal_at(&self, frame: u64) -> SignalParams {
        self.signal_segments
            .iter()
            .rev()
            .find(|(start, _)| *start <= frame)
            .map_or_else(|| self.settings.signal_params(), |(_, params)| *params)
    }

    /// The first signal change after `frame`, if any.
    fn signal_change_after(&self, frame: u64) -> Option<u64> {
        self.signal_segments
            .iter()
            .map(|(start, _)| *start)
            .find(|&start| start > frame)
    }

    /// Whether a signal change starts exactly at `frame`.
    fn signal_changes_at(&self, frame: u64) -> bool {
        frame > 0
            && self
                .signal_segments
                .iter()
                .any(|(start, _)| *start == frame)
    }

    /// Whether `settings` can be served: the `File` signal needs a source with as many
    /// channels as the frames.
    fn source_fits(&self, settings: &Settings) -> bool {
        settings.signal != SignalKind::File
            || self
                .source
                .as_ref()
                .is_some_and(|s| s.channels == settings.channels)
    }

    /// Deterministic mode: the paced clock runs in virtual time. Frame n is sampled at
    /// n × 10⁹ / rate_hz ns, the device samples exactly as far as posted buffers need (the
    /// driver is never too slow), buffers complete when full (or on STOP/FLUSH), and scenario
    /// steps fire at virtual times, so the same settings, scenario and buffer sizes give a
    /// bit-identical stream — fault points included — on every run, however fast the host.
    pub fn set_deterministic(&mut self, deterministic: bool) {
        self.deterministic = deterministic;
    }

    fn virtual_time_ns(&self, frame: u64) -> u64 {
        let rate = u128::from(self.settings.rate_hz.max(1));
        u64::try_from(u128::from(frame) * NS_PER_SEC / rate).unwrap_or(u64::MAX)
    }

    /// Deterministic mode's replacement for the paced clock (see [`Card::set_deterministic`]).
    fn run_virtual(&mut self, out: &mut Vec<Completion<B>>) {
        loop {
            let now = self.virtual_time_ns(self.next_frame);
            self.run_timeline(now);
            if self.state != DeviceState::Running {
                return;
            }
            if self.stall_until_frame > self.next_frame {
                // A stall: the stalled stretch is sampled at once (up to the next scenario
                // step, which must fire at its exact frame); the FIFO keeps what fits and the
                // rest is dropped.
                let mut count = self.stall_until_frame - self.next_frame;
                if let Some(step) = self
                    .timeline
                    .as_ref()
                    .and_then(|t| t.next_frame(self.settings.rate_hz))
                    .filter(|&step| step > self.next_frame)
                {
                    count = count.min(step - self.next_frame);
                }
                let space = u64::from(self.limits.fifo_frames) - self.fifo_level;
                if space > 0 {
                    self.accept_frames(count.min(space), now);
                }
                if count > space {
                    self.drop_frames(count - space, now);
                }
                continue;
            }
            if self.posted.is_empty() {
                return;
            }
            if self.fifo_level > 0 {
                self.drain(now, true, out);
                continue;
            }
            let Some(front) = self.posted.front() else {
                return;
            };
            if front.filled > 0 && front.first_frame + front.filled != self.next_frame {
                // Frames were dropped since this buffer's last one: it ends here.
                self.complete_front(0, now, out);
                continue;
            }
            let mut count = front.capacity_frames - front.filled;
            // Stop at the next scenario step so it fires at its exact frame.
            if let Some(step_frame) = self
                .timeline
                .as_ref()
                .and_then(|t| t.next_frame(self.settings.rate_hz))
            {
                if step_frame > self.next_frame {
                    count = count.min(step_frame - self.next_frame);
                }
            }
            let run = Run {
                first: self.next_frame,
                len: count,
                origin_ns: 0,
                origin_frame: 0,
            };
            self.end_overrun(now);
            let taken = self.fill_front(&run, count, now, out);
            self.next_frame += taken;
            self.counters.frames_produced += taken;
        }
    }

    /// Loads a scenario; its clock starts at the next START (and again after each reset).
    pub fn set_scenario(&mut self, scenario: Scenario) {
        self.timeline = Some(Timeline::new(&scenario));
        self.scenario = Some(scenario);
    }

    /// Whether a scenario step asked to close the connection (cleared by the call).
    pub fn take_disconnect_request(&mut self) -> bool {
        std::mem::take(&mut self.disconnect_requested)
    }

    /// Fires the scenario steps that are due.
    fn run_timeline(&mut self, now_ns: u64) {
        let Some(started) = self.stream_started_ns else {
            return;
        };
        let next_frame = self.next_frame;
        let Some(timeline) = self.timeline.as_mut() else {
            return;
        };
        for step in timeline.due(now_ns.saturating_sub(started), next_frame) {
            log::info!("scenario line {}: {:?}", step.line, step.action);
            self.apply(step.action, now_ns);
        }
    }

    /// Changes delivery parameters that leave the samples alone, at any time.
    pub fn adjust(
        &mut self,
        latency_us: Option<u32>,
        coalesce_buffers: Option<u16>,
        watermark_frames: Option<u32>,
    ) -> Result<(), SettingsError> {
        let adjusted = Settings {
            latency_us: latency_us.unwrap_or(self.settings.latency_us),
            coalesce_buffers: coalesce_buffers.unwrap_or(self.settings.coalesce_buffers),
            watermark_frames: watermark_frames.unwrap_or(self.settings.watermark_frames),
            ..self.settings
        };
        adjusted.validate(&self.limits)?;
        self.settings = adjusted;
        Ok(())
    }

    /// Applies a scripted action now (from a scenario step or the control socket).
    pub fn apply(&mut self, action: Action, now_ns: u64) {
        match action {
            Action::DropInterrupts(count) => {
                self.drop_interrupts = self.drop_interrupts.saturating_add(count)
            }
            Action::DelayCompletions(duration) => {
                // Completions are held on the real clock (virtual time may run ahead or
                // behind it in deterministic mode).
                let real = if self.deterministic {
                    self.real_now_ns
                } else {
                    now_ns
                };
                self.delay_completions_until_ns = real.saturating_add(duration);
            }
            Action::Stall(duration) => {
                // At most a minute of stall: bounded virtual time, no index wrap-around.
                let duration = duration.min(60 * 1_000_000_000);
                if self.deterministic {
                    let frames =
                        u128::from(duration) * u128::from(self.settings.rate_hz) / NS_PER_SEC;
                    self.stall_until_frame = self
                        .next_frame
                        .saturating_add(u64::try_from(frames).unwrap_or(u64::MAX));
                } else {
                    self.stall_until_ns = now_ns.saturating_add(duration);
                }
            }
            Action::CorruptCrc(count) => {
                self.corrupt_buffers = self.corrupt_buffers.saturating_add(count)
            }
            Action::Fault(code) => {
                self.push_event(kind::FAULT, now_ns, u64::from(code), 0);
            }
            Action::NeedsReset => self.enter_needs_reset(vdaq_wire::event::fault::FIRMWARE, now_ns),
            Action::Trigger => {
                self.trigger_at = Some(self.next_frame);
            }
            Action::Disconnect => self.disconnect_requested = true,
            Action::SetSignal {
                signal,
                freq_mhz,
                amplitude_permille,
            } => {
                let changed = Settings {
                    signal,
                    signal_freq_mhz: freq_mhz.unwrap_or(self.settings.signal_freq_mhz),
                    amplitude_permille: amplitude_permille
                        .unwrap_or(self.settings.amplitude_permille),
                    ..self.settings
                };
                if !self.source_fits(&changed) {
                    warn!(
                        "set_signal to file ignored: no source with {} channels",
                        changed.channels
                    );
                    return;
                }
                if self.signal_segments.is_empty() {
                    // Frames sampled so far keep the signal they were sampled with.
                    self.signal_segments
                        .push_back((0, self.settings.signal_params()));
                }
                self.signal_segments
                    .push_back((self.next_frame, changed.signal_params()));
                self.settings = changed;
            }
        }
    }

    fn frame_bytes(&self) -> usize {
        self.settings.format.sample_bytes() * usize::from(self.settings.channels)
    }

    /// Starts the sample clock.
    pub fn start(&mut self, now_ns: u64) -> u32 {
        match self.state {
            DeviceState::NeedsReset => control::status::BUSY,
            DeviceState::Running => control::status::OK,
            DeviceState::Stopped => {
                self.state = DeviceState::Running;
                if self.deterministic {
                    // Virtual time: frame n is sampled at n × 10⁹ / rate, scenario time zero
                    // is frame 0.
                    self.stream_started_ns = Some(0);
                    self.origin_ns = self.virtual_time_ns(self.next_frame);
                } else {
                    self.stream_started_ns.get_or_insert(now_ns);
                    self.origin_ns = now_ns;
                }
                self.origin_frame = self.next_frame;
                control::status::OK
            }
        }
    }

    /// Stops the sample clock: frames due up to now are sampled, moved into buffers, and the
    /// partly filled buffer completes with STOPPED.
    pub fn stop(&mut self, now_ns: u64, out: &mut Vec<Completion<B>>) -> u32 {
        match self.state {
            DeviceState::NeedsReset => control::status::BUSY,
            DeviceState::Stopped => control::status::OK,
            DeviceState::Running => {
                if self.settings.clock == ClockMode::Paced && !self.deterministic {
                    let due = self.due_frame(now_ns);
                    self.produce_until(due, now_ns, out);
                }
                self.end_overrun(now_ns);
                self.state = DeviceState::Stopped;
                self.drain(now_ns, true, out);
                if self.posted.front().is_some_and(|p| p.filled > 0) {
                    self.complete_front(flags::STOPPED, now_ns, out);
                }
                control::status::OK
            }
        }
    }

    /// Applies new settings (only while stopped). Held buffers are re-sized to the new frame
    /// size; one too small for a single frame is returned with BAD_BUFFER.
    pub fn configure(
        &mut self,
        settings: Settings,
        now_ns: u64,
        out: &mut Vec<Completion<B>>,
    ) -> u32 {
        if self.state != DeviceState::Stopped {
            return control::status::BUSY;
        }
        if let Err(err) = settings.validate(&self.limits) {
            debug!("CONFIGURE refused: {err}");
            return control::status::INVALID;
        }
        if !self.source_fits(&settings) {
            debug!("CONFIGURE refused: the file signal needs a source with as many channels");
            return control::status::INVALID;
        }
        if self.frames_pending() > 0 && settings != self.settings {
            // Frames sampled under the old settings are still on their way; refusing keeps
            // every buffer's header true to its payload.
            debug!("CONFIGURE refused: frames sampled under the old settings are pending");
            return control::status::BUSY;
        }
        let old = self.settings;
        let samples_change = (
            old.rate_hz,
            old.channels,
            old.format,
            old.signal,
            old.signal_freq_mhz,
            old.amplitude_permille,
            old.seed,
            old.clock,
        ) != (
            settings.rate_hz,
            settings.channels,
            settings.format,
            settings.signal,
            settings.signal_freq_mhz,
            settings.amplitude_permille,
            settings.seed,
            settings.clock,
        );
        if samples_change {
            self.discontinuity = true;
        }
        self.settings = settings;
        self.signal_segments.clear();
        if self
            .hw_trigger
            .is_some_and(|t| t.channel >= settings.channels)
        {
            self.hw_trigger = None;
        }
        // No buffer is partly filled here (frames_pending is 0), so capacities can be redone.
        let frame_bytes = self.frame_bytes() as u64;
        for posted in std::mem::take(&mut self.posted) {
            let capacity_frames = posted.buffer.payload_capacity() as u64 / frame_bytes;
            if capacity_frames == 0 {
                self.reject_buffer(posted.buffer, now_ns, out);
            } else {
                self.posted.push_back(Posted {
                    capacity_frames: capacity_frames.min(u64::from(u32::MAX)),
                    ..posted
                });
            }
        }
        control::status::OK
    }

    /// Software trigger: the next frame sampled is the trigger frame.
    pub fn trigger(&mut self) -> u32 {
        match self.state {
            DeviceState::NeedsReset => control::status::BUSY,
            _ => {
                self.trigger_at = Some(self.next_frame);
                control::status::OK
            }
        }
    }

    /// Returns every held buffer now: FIFO contents go into them first, the rest complete
    /// empty, all flagged FLUSHED. Returns how many buffers were returned.
    pub fn flush(&mut self, now_ns: u64, out: &mut Vec<Completion<B>>) -> u32 {
        if self.state == DeviceState::Running
            && self.settings.clock == ClockMode::Paced
            && !self.deterministic
        {
            let due = self.due_frame(now_ns);
            self.produce_until(due, now_ns, out);
        }
        let before = out.len();
        self.drain(now_ns, true, out);
        while !self.posted.is_empty() {
            self.complete_front(flags::FLUSHED, now_ns, out);
        }
        (out.len() - before) as u32
    }

    /// Zeroes the counters (the stream position is kept).
    pub fn reset_counters(&mut self) {
        // Frames already sampled but not yet completed belong to the new window, so that
        // produced = delivered + dropped + pending keeps holding.
        self.counters = Counters {
            frames_produced: self.frames_pending(),
            ..Counters::default()
        };
    }

    /// STATUS reply.
    pub fn status(&self, now_ns: u64) -> Status {
        Status {
            device_time_ns: now_ns.into(),
            frames_produced: self.counters.frames_produced.into(),
            frames_delivered: self.counters.frames_delivered.into(),
            frames_dropped: self.counters.frames_dropped.into(),
            buffers_completed: self.counters.buffers_completed.into(),
            buffers_held: (self.posted.len() as u64).into(),
            frames_pending: self.frames_pending().into(),
            requests_rejected: self.counters.requests_rejected.into(),
            state: self.state as u8,
            reserved: [0; 7],
        }
    }

    /// The configuration space as the driver sees it now.
    pub fn config_space(&self) -> DaqConfig {
        let mut model = [0u8; MODEL_LEN];
        let name = vdaq_wire::MODEL_NAME;
        model[..name.len()].copy_from_slice(name);
        let s = &self.settings;
        DaqConfig {
            max_channels: self.limits.max_channels.into(),
            channels: s.channels.into(),
            supported_formats: SampleFormat::ALL
                .iter()
                .fold(0, |mask, f| mask | f.mask())
                .into(),
            min_rate_hz: self.limits.min_rate_hz.into(),
            max_rate_hz: self.limits.max_rate_hz.into(),
            rate_hz: s.rate_hz.into(),
            fifo_frames: self.limits.fifo_frames.into(),
            watermark_frames: s.watermark_frames.into(),
            latency_us: s.latency_us.into(),
            signal_freq_mhz: s.signal_freq_mhz.into(),
            coalesce_buffers: s.coalesce_buffers.into(),
            amplitude_permille: s.amplitude_permille.into(),
            format: s.format as u8,
            signal: s.signal as u8,
            clock: s.clock as u8,
            state: self.state as u8,
            fault_code: self.fault_code.into(),
            seed: s.seed.into(),
            frames_produced: self.counters.frames_produced.into(),
            frames_delivered: self.counters.frames_delivered.into(),
            frames_dropped: self.counters.frames_dropped.into(),
            buffers_completed: self.counters.buffers_completed.into(),
            requests_rejected: self.counters.requests_rejected.into(),
            firmware_version: vdaq_wire::FIRMWARE_VERSION.into(),
            events_lost: self.counters.events_lost.into(),
            model,
        }
    }

    /// Executes one control command whose header and payload were read from the guest.
    /// `payload` is exactly what followed the header; its size is checked here.
    pub fn execute(
        &mut self,
        op: u32,
        payload: &[u8],
        now_ns: u64,
        out: &mut Vec<Completion<B>>,
    ) -> CommandReply {
        let Some(expected) = control::command_payload_size(op) else {
            return CommandReply::status(control::status::UNSUPPORTED);
        };
        if payload.len() != expected {
            return CommandReply::status(control::status::BAD_SIZE);
        }
        if self.state == DeviceState::NeedsReset && op != opcode::GET_STATUS {
            return CommandReply::status(control::status::BUSY);
        }
        match op {
            opcode::START => CommandReply::status(self.start(now_ns)),
            opcode::STOP => CommandReply::status(self.stop(now_ns, out)),
            opcode::CONFIGURE => {
                let Ok(cfg) = Configure::read_from_bytes(payload) else {
                    return CommandReply::status(control::status::BAD_SIZE);
                };
                match Settings::from_wire(&cfg) {
                    Ok(settings) => CommandReply::status(self.configure(settings, now_ns, out)),
                    Err(err) => {
                        debug!("CONFIGURE refused: {err}");
                        CommandReply::status(control::status::INVALID)
                    }
                }
            }
            opcode::TRIGGER if !self.trigger_enabled => {
                CommandReply::status(control::status::UNSUPPORTED)
            }
            opcode::TRIGGER => CommandReply::status(self.trigger()),
            opcode::SET_TRIGGER if !self.trigger_enabled => {
                CommandReply::status(control::status::UNSUPPORTED)
            }
            opcode::SET_TRIGGER => {
                match vdaq_wire::control::TriggerConfig::read_from_bytes(payload) {
                    Ok(config) => CommandReply::status(self.set_trigger(&config)),
                    Err(_) => CommandReply::status(control::status::BAD_SIZE),
                }
            }
            opcode::FLUSH => {
                let returned = self.flush(now_ns, out);
                CommandReply {
                    status: control::status::OK,
                    payload: FlushReply {
                        buffers_returned: returned.into(),
                        reserved: 0.into(),
                    }
                    .as_bytes()
                    .to_vec(),
                }
            }
            opcode::GET_STATUS => CommandReply {
                status: control::status::OK,
                payload: self.status(now_ns).as_bytes().to_vec(),
            },
            opcode::RESET_COUNTERS => {
                self.reset_counters();
                CommandReply::status(control::status::OK)
            }
            _ => CommandReply::status(control::status::UNSUPPORTED),
        }
    }
}

#[cfg(test)]
mod tests;
