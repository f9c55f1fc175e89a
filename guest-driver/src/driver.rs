//! The vdaq driver proper: feature negotiation, the three queues, the request table, the
//! bottom half, commands and shutdown.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

use vdaq_wire::buffer::{status as buffer_status, BufferHeader, HEADER_SIZE};
use vdaq_wire::check::{self, StreamError};
use vdaq_wire::config::DaqConfig;
use vdaq_wire::control::{
    self, opcode, CommandStatus, Configure, FlushReply, Opcode, Status, TriggerConfig,
};
use vdaq_wire::event::{Event, EVENT_SIZE};
use vdaq_wire::violation::Violation;
use vdaq_wire::{feature, queue, ClockMode, DeviceState, SampleFormat, SignalKind};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, Transport};
use virtio_drivers::Hal;
use zerocopy::{FromBytes, IntoBytes};

use crate::dma::DmaBuffer;
use crate::irq::IrqState;

/// Data-queue size: the most reads that can be in flight.
pub const DATA_QUEUE_SIZE: usize = 256;
const CONTROL_QUEUE_SIZE: usize = 8;
const EVENT_QUEUE_SIZE: usize = 16;
/// Event buffers kept posted.
const EVENT_BUFFERS: usize = 8;
/// Largest reply payload of any command.
const MAX_REPLY: usize = 128;

/// Errors of the driver.
#[derive(Debug)]
pub enum DriverError {
    /// A virtqueue or transport operation failed.
    Virtio(virtio_drivers::Error),
    /// The device lacks a feature the driver needs.
    MissingFeature(u32),
    /// The device did not accept the features the driver wrote (FEATURES_OK did not stay
    /// set); carries the feature bits written.
    FeaturesRefused(u64),
    /// The device answered a command with a non-OK status.
    Command {
        /// The command.
        opcode: Opcode,
        /// Status code as the device sent it ([`CommandStatus::from_code`] types it).
        status: u32,
    },
    /// A reply was malformed.
    BadReply(u32),
    /// The wait gave up before the device answered.
    Timeout,
    /// A read buffer cannot hold the header and one frame.
    BufferTooSmall {
        /// Bytes offered.
        len: usize,
        /// Bytes needed at least.
        needed: usize,
    },
    /// Every data-queue slot is in use.
    QueueFull,
    /// The driver is shutting down and takes no new reads.
    ShuttingDown,
    /// The device is in NEEDS_RESET.
    NeedsReset,
    /// The device is not a vdaq card this driver can use (spec 5.x.1: ID 21 is also
    /// another device type's), or its configuration space holds impossible values.
    NotVdaq(vdaq_wire::config::IdentityError),
    /// The command needs a feature that was not negotiated (TRIGGER, SET_TRIGGER).
    FeatureNotNegotiated(u32),
    /// The payload is not the size the opcode's payload has (spec 5.x.6.8); nothing was sent.
    PayloadSize {
        /// The command.
        opcode: u32,
        /// Bytes given.
        len: usize,
        /// Bytes the opcode's payload has.
        expected: usize,
    },
    /// A CONFIGURE setting lies outside the limits the configuration space states (or is an
    /// unknown code); names the field. Nothing was sent.
    OutOfRange(&'static str),
}

impl From<virtio_drivers::Error> for DriverError {
    fn from(err: virtio_drivers::Error) -> Self {
        match err {
            virtio_drivers::Error::QueueFull => DriverError::QueueFull,
            other => DriverError::Virtio(other),
        }
    }
}

/// What the driver negotiates.
#[derive(Clone, Copy, Debug, Default)]
pub struct DriverOptions {
    /// Ask for payload CRCs (VIRTIO_DAQ_F_CRC32).
    pub crc: bool,
    /// Ask for the TRIGGER command (VIRTIO_DAQ_F_TRIGGER).
    pub trigger: bool,
}

/// Sleeps until something may have happened (an interrupt). Returns false to give up
/// (a deadline passed).
pub trait Wait {
    /// Waits once.
    fn wait(&mut self) -> bool;
    /// A new bounded wait begins (a command was sent): a wait with a deadline per command
    /// restarts it here.
    fn restart(&mut self) {}
}

/// Identifies a submitted read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// How a read ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// The device filled the buffer: header checked against the used length.
    Data(BufferHeader),
    /// The device returned the buffer with nothing valid in it (used length 0, or a
    /// BAD_BUFFER header).
    Rejected,
    /// The used length or header contradicts what was submitted; the buffer's contents must
    /// not be trusted.
    Invalid {
        /// Used length the device reported.
        used: usize,
    },
    /// The application cancelled the read; the device returned the buffer.
    Cancelled,
    /// The device never returned the read; the driver took it back after resetting the
    /// device ([`DaqDriver::recover`]). Nothing in it is valid.
    Reclaimed,
}

/// A finished read: the buffer is the application's again.
#[derive(Debug)]
pub struct Completion<H: Hal> {
    /// The read.
    pub id: RequestId,
    /// The buffer as submitted, now filled.
    pub buffer: DmaBuffer<H>,
    /// Used length reported by the device.
    pub used_len: usize,
    /// How it ended.
    pub outcome: ReadOutcome,
}

/// Counters of the driver's own work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Bottom-half runs that found work pending.
    pub bottom_halves: u64,
    /// Completions found only by the re-check after unmasking (the gap the re-check closes).
    pub found_on_recheck: u64,
    /// Reads completed.
    pub completed: u64,
    /// Reads the device rejected.
    pub rejected: u64,
    /// Reads whose used length or header was inconsistent.
    pub invalid: u64,
    /// Reads returned as cancelled.
    pub cancelled: u64,
    /// Events received.
    pub events: u64,
    /// Notifications sent to the device for the data queue.
    pub data_notifications: u64,
    /// Configuration-change notifications taken (each one re-reads the settings and `state`).
    pub config_changes: u64,
    /// Command replies found on the control ring only by the look the driver takes after its
    /// wait gave up (a lost interrupt).
    pub replies_after_timeout: u64,
    /// Command replies found on the control ring by the look the driver takes at each
    /// wake-up of a command wait with no interrupt pending (a lost or withheld interrupt).
    pub replies_polled: u64,
    /// Protocol violations of the device detected ([`DaqDriver::violation`] has the first).
    pub violations: u64,
    /// Events of kinds this driver does not know, ignored (spec 5.x.6.9).
    pub unknown_events: u64,
}

/// Result of [`DaqDriver::recover`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Device counters just before the reset (GET_STATUS still answers in NEEDS_RESET); None
    /// if the control queue could not be used (a command stuck, or its ring corrupt).
    pub status: Option<Status>,
    /// Reads the device returned while being reset (now in [`DaqDriver::next_completion`]).
    pub returned: usize,
    /// Reads the device never returned, taken back after the reset (outcome `Reclaimed`).
    pub reclaimed: usize,
}

/// Result of [`DaqDriver::shutdown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Reads that were in flight when shutdown began.
    pub in_flight_at_start: usize,
    /// Reads the device returned during shutdown.
    pub returned: usize,
    /// What FLUSH said it returned.
    pub flush_returned: u32,
    /// Buffers the device said it still held after the drain (must be 0).
    pub device_held_after: u64,
    /// Device counters at the end.
    pub status: Status,
}

struct Slot<H: Hal> {
    id: RequestId,
    buffer: DmaBuffer<H>,
    cancelled: bool,
}

struct PendingCommand<H: Hal> {
    token: u16,
    request: DmaBuffer<H>,
    reply: DmaBuffer<H>,
    opcode: u32,
}

/// The vdaq driver over transport `T`, DMA through `H`.
pub struct DaqDriver<H: Hal, T: Transport> {
    transport: T,
    irq: &'static IrqState,
    data: VirtQueue<H, DATA_QUEUE_SIZE>,
    control: VirtQueue<H, CONTROL_QUEUE_SIZE>,
    events: VirtQueue<H, EVENT_QUEUE_SIZE>,
    /// Request table, indexed by the data queue's descriptor token.
    table: Vec<Option<Slot<H>>>,
    in_flight: usize,
    completions: VecDeque<Completion<H>>,
    event_slots: Vec<Option<DmaBuffer<H>>>,
    received_events: VecDeque<Event>,
    command: Option<PendingCommand<H>>,
    /// The finished command's raw status and reply payload, or why its reply was unusable.
    command_reply: Option<Result<(u32, Vec<u8>), DriverError>>,
    features: u64,
    /// The configuration space as last read (at init, CONFIGURE, a configuration change,
    /// recovery): the settings the driver goes by.
    settings: DaqConfig,
    frame_bytes: usize,
    next_id: u64,
    /// Data-queue buffers made available so far (mod 2^16 is the avail index).
    data_added: u64,
    data_added_at_notify: u64,
    shutting_down: bool,
    needs_reset: bool,
    /// A used ring returned an entry the driver cannot take.
    ring_corrupt: bool,
    /// Data-queue tokens of accepted reads, oldest first: the device completes accepted
    /// reads in the order they were made available (spec 5.x.6.2).
    order: VecDeque<u16>,
    /// The `sequence` the next completed buffer with a header carries (None until the first
    /// after initialisation): the device numbers completions one by one (spec 5.x.6.1).
    next_sequence: Option<u64>,
    /// The first protocol violation of the device detected.
    violation: Option<Violation>,
    stats: DriverStats,
}

impl<H: Hal, T: Transport> core::fmt::Debug for DaqDriver<H, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DaqDriver")
            .field("in_flight", &self.in_flight)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// Checks CONFIGURE settings against the limits of the configuration space (spec 5.x.6.8:
/// what the device answers INVALID); names the first field out of range.
fn check_settings(settings: &Configure, limits: &DaqConfig) -> Result<(), &'static str> {
    let channels = settings.channels.get();
    if channels == 0 || channels > limits.max_channels.get() {
        return Err("channels");
    }
    match SampleFormat::from_code(settings.format) {
        Some(format) if limits.supported_formats.get() & format.mask() != 0 => {}
        _ => return Err("format"),
    }
    let rate = settings.rate_hz.get();
    if rate < limits.min_rate_hz.get() || rate > limits.max_rate_hz.get() {
        return Err("rate_hz");
    }
    if settings.latency_us.get() == 0 {
        return Err("latency_us");
    }
    let watermark = settings.watermark_frames.get();
    if watermark == 0 || watermark > limits.fifo_frames.get() {
        return Err("watermark_frames");
    }
    if settings.coalesce_buffers.get() == 0 {
        return Err("coalesce_buffers");
    }
    if settings.amplitude_permille.get() > 1000 {
        return Err("amplitude_permille");
    }
    if SignalKind::from_code(settings.signal).is_none() {
        return Err("signal");
    }
    if ClockMode::from_code(settings.clock).is_none() {
        return Err("clock");
    }
    Ok(())
}

impl<H: Hal, T: Transport> DaqDriver<H, T> {
    /// Initialises the device behind `transport`: negotiates features, sets up the queues,
    /// posts event buffers, unmasks the interrupt and sets DRIVER_OK.
    pub fn new(
        mut transport: T,
        irq: &'static IrqState,
        options: DriverOptions,
    ) -> Result<Self, DriverError> {
        let mut wanted = (1 << feature::VIRTIO_F_VERSION_1) | (1 << feature::VIRTIO_F_EVENT_IDX);
        if options.crc {
            wanted |= 1 << feature::DAQ_F_CRC32;
        }
        if options.trigger {
            wanted |= 1 << feature::DAQ_F_TRIGGER;
        }
        let features = transport.begin_init(Features(wanted)).0;
        if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            // virtio 3.1.1 step 6: the device did not accept the feature subset.
            transport.set_status(DeviceStatus::FAILED);
            return Err(DriverError::FeaturesRefused(features));
        }
        if !has(features, feature::VIRTIO_F_VERSION_1) {
            transport.set_status(DeviceStatus::FAILED);
            return Err(DriverError::MissingFeature(feature::VIRTIO_F_VERSION_1));
        }
        let identity = transport
            .read_config_space::<DaqConfig>(0)
            .map_err(DriverError::from)
            .and_then(|config| {
                config
                    .identify()
                    .map(|_| config)
                    .map_err(DriverError::NotVdaq)
            });
        let settings = match identity {
            Ok(config) => config,
            Err(err) => {
                transport.set_status(DeviceStatus::FAILED);
                return Err(err);
            }
        };
        let event_idx = has(features, feature::VIRTIO_F_EVENT_IDX);
        // A queue set up before a later one fails is freed when it is dropped: the device must
        // be reset first, so that it forgets the ring's address.
        fn give_up<T: Transport>(transport: &mut T) {
            transport.set_status(DeviceStatus::empty());
            transport.set_status(DeviceStatus::FAILED);
        }
        let data = match VirtQueue::new(&mut transport, queue::DATA, false, event_idx) {
            Ok(queue) => queue,
            Err(err) => {
                give_up(&mut transport);
                return Err(err.into());
            }
        };
        let control = match VirtQueue::new(&mut transport, queue::CONTROL, false, event_idx) {
            Ok(queue) => queue,
            Err(err) => {
                give_up(&mut transport);
                drop(data);
                return Err(err.into());
            }
        };
        let events = match VirtQueue::new(&mut transport, queue::EVENT, false, event_idx) {
            Ok(queue) => queue,
            Err(err) => {
                give_up(&mut transport);
                drop((data, control));
                return Err(err.into());
            }
        };
        transport.finish_init();
        let mut driver = DaqDriver {
            transport,
            irq,
            data,
            control,
            events,
            table: (0..DATA_QUEUE_SIZE).map(|_| None).collect(),
            in_flight: 0,
            completions: VecDeque::new(),
            event_slots: (0..EVENT_QUEUE_SIZE).map(|_| None).collect(),
            received_events: VecDeque::new(),
            command: None,
            command_reply: None,
            features,
            settings,
            frame_bytes: 0,
            next_id: 0,
            data_added: 0,
            data_added_at_notify: 0,
            shutting_down: false,
            needs_reset: false,
            ring_corrupt: false,
            order: VecDeque::with_capacity(DATA_QUEUE_SIZE),
            next_sequence: None,
            violation: None,
            stats: DriverStats::default(),
        };
        driver.refresh_settings()?;
        for _ in 0..EVENT_BUFFERS {
            driver.post_event_buffer()?;
        }
        irq.unmask();
        Ok(driver)
    }

    /// Features agreed with the device.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Reads the configuration space.
    pub fn config(&self) -> Result<DaqConfig, DriverError> {
        Ok(self.transport.read_config_space::<DaqConfig>(0)?)
    }

    /// Reads the configuration space again and goes by its settings from now on; the frame
    /// size is kept if the space names an unknown format.
    fn refresh_settings(&mut self) -> Result<DaqConfig, DriverError> {
        let config = self.config()?;
        self.settings = config;
        let format = SampleFormat::from_code(config.format).ok_or(DriverError::BadReply(0))?;
        self.frame_bytes = format.sample_bytes() * usize::from(config.channels.get());
        Ok(config)
    }

    /// The configuration space as the driver last read it (at init, CONFIGURE, each
    /// configuration-change notification, recovery): the settings it goes by. Its counters
    /// are stale; [`Self::status`] has current ones.
    pub fn settings(&self) -> &DaqConfig {
        &self.settings
    }

    /// Frames the posted reads can hold at the current frame size.
    pub fn posted_frames(&self) -> u64 {
        let frame = self.frame_bytes.max(1);
        self.table
            .iter()
            .flatten()
            .map(|slot| (slot.buffer.len().saturating_sub(HEADER_SIZE) / frame) as u64)
            .sum()
    }

    /// Frames the reads posted while streaming should be able to hold (spec 5.x.6.2): what
    /// the paced clock produces in one latency bound, rate_hz × latency_us / 10⁶ rounded up,
    /// under [`Self::settings`]; 0 with the free-running clock, which never overruns.
    pub fn frames_to_keep_posted(&self) -> u64 {
        if self.settings.clock != ClockMode::Paced as u8 {
            return 0;
        }
        (u64::from(self.settings.rate_hz.get()) * u64::from(self.settings.latency_us.get()))
            .div_ceil(1_000_000)
    }

    /// Bytes per frame under the device's current settings.
    pub fn frame_bytes(&self) -> usize {
        self.frame_bytes
    }

    /// Counters of the driver's work.
    pub fn stats(&self) -> DriverStats {
        self.stats
    }

    /// Reads in the device's hands.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the device has returned buffers the bottom half has not taken yet (what a
    /// lost-interrupt watchdog looks for).
    pub fn completions_waiting(&self) -> bool {
        self.data.can_pop() || self.control.can_pop() || self.events.can_pop()
    }

    /// Whether the device reported NEEDS_RESET (or broke the protocol so that it must be
    /// reset).
    pub fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    /// The first protocol violation of the device detected, if any (the device is untrusted:
    /// a violation is counted, reported and survived, never trusted).
    pub fn violation(&self) -> Option<Violation> {
        self.violation
    }

    fn note_violation(&mut self, violation: Violation) {
        self.stats.violations += 1;
        log::error!("{}", violation.describe());
        self.violation.get_or_insert(violation);
    }

    /// Submits a read: the buffer belongs to the device until its [`Completion`] comes back
    /// (or the buffer comes back at once with the error if it cannot be submitted). The
    /// device is notified if it asked to be.
    pub fn submit_read(
        &mut self,
        buffer: DmaBuffer<H>,
    ) -> Result<RequestId, (DriverError, DmaBuffer<H>)> {
        let id = self.submit_read_batched(buffer)?;
        self.notify_data();
        Ok(id)
    }

    /// Like [`Self::submit_read`] without notifying the device: for submitting many reads
    /// with one notification, sent by [`Self::kick`].
    pub fn submit_read_batched(
        &mut self,
        mut buffer: DmaBuffer<H>,
    ) -> Result<RequestId, (DriverError, DmaBuffer<H>)> {
        if self.shutting_down {
            return Err((DriverError::ShuttingDown, buffer));
        }
        if self.needs_reset {
            return Err((DriverError::NeedsReset, buffer));
        }
        let needed = HEADER_SIZE + self.frame_bytes;
        if buffer.len() < needed {
            let len = buffer.len();
            return Err((DriverError::BufferTooSmall { len, needed }, buffer));
        }
        // SAFETY: the buffer moves into the request table below and is neither touched nor
        // freed until pop_used hands it back.
        let token = match unsafe { self.data.add(&[], &mut [buffer.as_mut_slice()]) } {
            Ok(token) => token,
            Err(err) => return Err((err.into(), buffer)),
        };
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.table[usize::from(token)] = Some(Slot {
            id,
            buffer,
            cancelled: false,
        });
        self.in_flight += 1;
        self.data_added += 1;
        self.order.push_back(token);
        Ok(id)
    }

    /// Notifies the device of reads submitted with [`Self::submit_read_batched`], if it
    /// asked to be.
    pub fn kick(&mut self) {
        if self.data_added != self.data_added_at_notify {
            self.notify_data();
        }
    }

    /// Notifies the device of new read buffers when it asked to be (EVENT_IDX), and always
    /// when the 16-bit avail index wrapped since the last notification: virtio-drivers 0.13's
    /// `should_notify` compares without wrap-around and can miss exactly that case.
    fn notify_data(&mut self) {
        // The avail-index write must be visible before avail_event is read (virtio's mb()).
        fence(Ordering::SeqCst);
        let before = self.data_added_at_notify as u16;
        let now = self.data_added as u16;
        if self.data.should_notify() || now < before {
            self.transport.notify(queue::DATA);
            self.stats.data_notifications += 1;
        }
        self.data_added_at_notify = self.data_added;
    }

    /// Marks a read cancelled. The device still owns the buffer; it comes back as
    /// [`ReadOutcome::Cancelled`] when the device returns it (at once after [`Self::flush`]).
    /// Returns false if no such read is in flight.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        match self.table.iter_mut().flatten().find(|slot| slot.id == id) {
            Some(slot) => {
                slot.cancelled = true;
                true
            }
            None => false,
        }
    }

    /// The bottom half: if the top half marked work pending, pop every used buffer from the
    /// three queues, validate and complete, then unmask the interrupt and re-check the rings
    /// so a completion that arrived in between is not left waiting for an interrupt that was
    /// masked. Returns the number of read completions produced.
    pub fn service(&mut self) -> usize {
        if !self.irq.take_pending() {
            return 0;
        }
        self.stats.bottom_halves += 1;
        let before = self.stats.completed;
        let mut first_pass = true;
        loop {
            let found = self.drain_data() + self.drain_control() + self.drain_events();
            if !first_pass {
                self.stats.found_on_recheck += found as u64;
            }
            first_pass = false;
            self.irq.unmask();
            if self.ring_corrupt {
                // An entry that cannot be taken stays on the ring: re-checking would spin.
                // The device must be reset (`recover`).
                self.needs_reset = true;
                break;
            }
            // The unmask (or, without a line to mask, nothing) must be ordered before the
            // re-check reads the used index: a full fence, as virtio's mb().
            fence(Ordering::SeqCst);
            if !(self.data.can_pop() || self.control.can_pop() || self.events.can_pop()) {
                break;
            }
        }
        if self.irq.take_config_changed() {
            self.stats.config_changes += 1;
            self.configuration_changed();
        }
        (self.stats.completed - before) as usize
    }

    /// A configuration-change notification (spec 5.x.4, 5.x.6.13): read the settings again
    /// (the operator may have changed them) and `state`.
    fn configuration_changed(&mut self) {
        match self.refresh_settings() {
            Ok(_) => {}
            Err(DriverError::BadReply(_)) => {
                log::warn!(
                    "configuration space names unknown format {}; frame size kept",
                    self.settings.format
                );
            }
            Err(err) => {
                log::warn!("cannot read the configuration space: {err:?}");
                return;
            }
        }
        if self.settings.identify().is_err() {
            // Spec 5.x.4: values no vdaq card can have; nothing it says can be trusted until
            // a reset (recovery checks the identity again).
            self.note_violation(Violation::ConfigImpossible);
            self.needs_reset = true;
        }
        if self.settings.state == DeviceState::NeedsReset as u8 {
            self.needs_reset = true;
        }
    }

    fn drain_data(&mut self) -> usize {
        if self.ring_corrupt {
            // Nothing on an untrusted ring is taken (or counted again) until the reset.
            return 0;
        }
        let mut found = 0;
        while let Some(token) = self.data.peek_used() {
            let in_flight = self
                .table
                .get(usize::from(token))
                .is_some_and(Option::is_some);
            if !in_flight {
                // A token the driver never submitted, or one not in flight (completed
                // twice, a used index that jumped): the ring is corrupt. Each pass takes a
                // slot or stops, so harvesting is bounded by the queue size.
                log::error!("data queue returned token {token}, not in flight");
                self.note_violation(if usize::from(token) >= DATA_QUEUE_SIZE {
                    Violation::UsedIdOutOfRange
                } else {
                    Violation::UsedIdNotInFlight
                });
                self.ring_corrupt = true;
                return found;
            }
            if self.order.front() != Some(&token) {
                // The device completes the reads it took in the order they were made
                // available (spec 5.x.6.2; this driver posts no buffer the device refuses
                // at once). Out of order, this may be a stale entry (a used index that
                // jumped) for a buffer the device still writes into: it stays in the table,
                // untouched and not freed, until the device is reset (`recover`).
                log::error!("data queue returned token {token} before older reads");
                self.note_violation(Violation::CompletionOrder);
                self.ring_corrupt = true;
                return found;
            }
            let Some(mut slot) = self.table[usize::from(token)].take() else {
                return found;
            };
            // SAFETY: this is the buffer that was added with `token`.
            let used = match unsafe {
                self.data
                    .pop_used(token, &[], &mut [slot.buffer.as_mut_slice()])
            } {
                Ok(used) => used as usize,
                Err(err) => {
                    log::error!("pop_used failed: {err:?}");
                    self.table[usize::from(token)] = Some(slot);
                    self.ring_corrupt = true;
                    return found;
                }
            };
            let judged = self.judge(&slot.buffer, used);
            if let Ok(ReadOutcome::Data(header)) = &judged {
                let sequence = header.sequence.get();
                if self.next_sequence.is_some_and(|next| next != sequence) {
                    // In order by token, out of order by the device's own count: a stale
                    // used entry (the used index jumped) for a buffer the device may still
                    // write, or a lying header. Kept until the reset, as above.
                    log::error!(
                        "read with sequence {sequence}, {:?} expected",
                        self.next_sequence
                    );
                    self.note_violation(Violation::CompletionOrder);
                    self.table[usize::from(token)] = Some(slot);
                    self.ring_corrupt = true;
                    return found;
                }
                self.next_sequence = Some(sequence + 1);
            }
            self.in_flight -= 1;
            found += 1;
            self.order.pop_front();
            let outcome = if slot.cancelled {
                self.stats.cancelled += 1;
                ReadOutcome::Cancelled
            } else {
                match judged {
                    Ok(outcome) => outcome,
                    Err(violation) => {
                        self.note_violation(violation);
                        ReadOutcome::Invalid { used }
                    }
                }
            };
            match outcome {
                ReadOutcome::Data(_) => self.stats.completed += 1,
                ReadOutcome::Rejected => self.stats.rejected += 1,
                ReadOutcome::Invalid { .. } => self.stats.invalid += 1,
                ReadOutcome::Cancelled | ReadOutcome::Reclaimed => {}
            }
            self.completions.push_back(Completion {
                id: slot.id,
                buffer: slot.buffer,
                used_len: used,
                outcome,
            });
        }
        found
    }

    /// Checks a returned buffer's used length and header against what was submitted (the
    /// wire crate's per-completion checks; the application verifies the stream).
    /// Anything the device got wrong is the violation it names.
    fn judge(&self, buffer: &DmaBuffer<H>, used: usize) -> Result<ReadOutcome, Violation> {
        if used == 0 {
            return Ok(ReadOutcome::Rejected);
        }
        let header = match check::completed_header(buffer.as_slice(), used) {
            Ok(header) => header,
            Err(StreamError::Status(buffer_status::BAD_BUFFER)) => {
                return Ok(ReadOutcome::Rejected)
            }
            Err(StreamError::UsedLength { .. }) if used > buffer.len() => {
                return Err(Violation::UsedLengthOverBuffer)
            }
            Err(StreamError::UsedLength { .. }) => return Err(Violation::UsedLengthUnderHeader),
            Err(_) => return Err(Violation::HeaderMalformed),
        };
        if header.frame_count.get() > 0
            && (header.format != self.settings.format || header.channels != self.settings.channels)
        {
            // Spec 5.x.6.2: a payload is whole frames of the configured frame: format and
            // channels as the driver configured them, not whatever the header claims.
            return Err(Violation::HeaderConfiguration);
        }
        match check::check_payload_length(&header, used) {
            Ok(()) => Ok(ReadOutcome::Data(header)),
            Err(StreamError::Format) => Err(Violation::HeaderMalformed),
            Err(_) => Err(Violation::HeaderLength),
        }
    }

    fn drain_control(&mut self) -> usize {
        let Some(token) = self.control.peek_used() else {
            return 0;
        };
        let Some(mut pending) = self.command.take() else {
            log::error!("control queue returned a buffer no command is waiting for");
            self.note_violation(Violation::ReplyUnsolicited);
            self.ring_corrupt = true;
            return 0;
        };
        if pending.token != token {
            log::error!(
                "control queue returned token {token}, expected {}",
                pending.token
            );
            self.note_violation(Violation::ReplyUnsolicited);
            self.command = Some(pending);
            self.ring_corrupt = true;
            return 0;
        }
        // SAFETY: these are the buffers added with `token`.
        let used = unsafe {
            self.control.pop_used(
                token,
                &[pending.request.as_slice()],
                &mut [pending.reply.as_mut_slice()],
            )
        };
        let reply = match used {
            Ok(used) if used as usize > pending.reply.len() => Err(Violation::ReplyLong),
            Ok(used) => control::decode_reply(&pending.reply.as_slice()[..used as usize])
                .map_err(|_| Violation::ReplyShort)
                .and_then(|(status, payload)| match CommandStatus::from_code(status) {
                    Some(_) => Ok((status, payload.to_vec())),
                    None => Err(Violation::ReplyStatus),
                }),
            // The token was checked: popping cannot fail.
            Err(_) => Err(Violation::ReplyUnsolicited),
        };
        let reply = reply.map_err(|violation| {
            self.note_violation(violation);
            DriverError::BadReply(pending.opcode)
        });
        match &reply {
            Ok((status, _)) => log::trace!("opcode {} answered {status}", pending.opcode),
            Err(_) => log::warn!("opcode {}: malformed reply", pending.opcode),
        }
        self.command_reply = Some(reply);
        1
    }

    fn drain_events(&mut self) -> usize {
        let mut found = 0;
        while let Some(token) = self.events.peek_used() {
            let Some(mut buffer) = self
                .event_slots
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                log::error!("event queue returned unknown token {token}");
                self.ring_corrupt = true;
                return found;
            };
            // SAFETY: the buffer added with `token`.
            let used = unsafe {
                self.events
                    .pop_used(token, &[], &mut [buffer.as_mut_slice()])
            };
            if let Ok(used) = used {
                if used as usize >= EVENT_SIZE {
                    if let Ok(event) = Event::read_from_bytes(&buffer.as_slice()[..EVENT_SIZE]) {
                        use vdaq_wire::event::kind;
                        match event.kind.get() {
                            kind::OVERRUN | kind::TRIGGER | kind::FAULT => {}
                            kind::NEEDS_RESET => self.needs_reset = true,
                            unknown => {
                                // Spec 5.x.6.9: changes nothing (a newer minor may define
                                // it).
                                log::warn!("event of unknown kind {unknown} ignored");
                                self.stats.unknown_events += 1;
                            }
                        }
                        // The application sees every event as it came.
                        self.received_events.push_back(event);
                        self.stats.events += 1;
                    }
                }
            }
            found += 1;
            if !self.shutting_down {
                drop(buffer);
                if let Err(err) = self.post_event_buffer() {
                    log::error!("cannot repost an event buffer: {err:?}");
                }
            }
        }
        found
    }

    fn post_event_buffer(&mut self) -> Result<(), DriverError> {
        let mut buffer = DmaBuffer::<H>::new(EVENT_SIZE);
        // SAFETY: kept in `event_slots` until popped.
        let token = unsafe { self.events.add(&[], &mut [buffer.as_mut_slice()])? };
        self.event_slots[usize::from(token)] = Some(buffer);
        if self.events.should_notify() {
            self.transport.notify(queue::EVENT);
        }
        Ok(())
    }

    /// The next finished read, oldest first.
    pub fn next_completion(&mut self) -> Option<Completion<H>> {
        self.completions.pop_front()
    }

    /// The next device event, oldest first.
    pub fn next_event(&mut self) -> Option<Event> {
        self.received_events.pop_front()
    }

    /// Sends a command and waits (through `wait`, servicing interrupts) for its reply.
    /// Returns (status, reply payload). The payload goes out as given (the typed commands
    /// zero its reserved fields); for a known opcode it must have that opcode's payload size.
    /// When `wait` gives up, the control ring is looked at once more before the wait counts
    /// as timed out (the reply's interrupt can be lost).
    pub fn command_raw(
        &mut self,
        op: u32,
        payload: &[u8],
        wait: &mut impl Wait,
    ) -> Result<(u32, Vec<u8>), DriverError> {
        if self.ring_corrupt {
            // Nothing is posted on a ring that cannot be trusted; recover() resets.
            return Err(DriverError::NeedsReset);
        }
        if self.command.is_some() {
            return Err(DriverError::QueueFull);
        }
        if matches!(op, opcode::TRIGGER | opcode::SET_TRIGGER)
            && !has(self.features, feature::DAQ_F_TRIGGER)
        {
            // Spec 5.x.3: the driver must not send them unless the feature was negotiated.
            return Err(DriverError::FeatureNotNegotiated(feature::DAQ_F_TRIGGER));
        }
        if let Some(expected) = control::command_payload_size(op) {
            // Spec 5.x.6.8: the readable part is exactly the header and the opcode's payload.
            if payload.len() != expected {
                return Err(DriverError::PayloadSize {
                    opcode: op,
                    len: payload.len(),
                    expected,
                });
            }
        }
        let mut request = DmaBuffer::<H>::new(control::HEADER_BYTES + payload.len());
        if let Err(control::FrameError::NoRoom { needed, len }) =
            control::encode_command(op, payload, request.as_mut_slice())
        {
            return Err(DriverError::BufferTooSmall { len, needed });
        }
        let mut reply = DmaBuffer::<H>::new(control::HEADER_BYTES + MAX_REPLY);
        // SAFETY: both buffers move into `self.command` and stay untouched until popped.
        let token = unsafe {
            self.control
                .add(&[request.as_slice()], &mut [reply.as_mut_slice()])?
        };
        self.command = Some(PendingCommand {
            token,
            request,
            reply,
            opcode: op,
        });
        self.command_reply = None;
        fence(Ordering::SeqCst);
        if self.control.should_notify() {
            self.transport.notify(queue::CONTROL);
        }
        wait.restart();
        loop {
            self.service();
            if let Some(reply) = self.command_reply.take() {
                return reply;
            }
            if self.ring_corrupt {
                // The control ring cannot be trusted: no reply will come; recover() resets.
                return Err(DriverError::NeedsReset);
            }
            let waited = wait.wait();
            if waited && !self.irq.is_pending() && self.control.can_pop() {
                // A reply on the ring and no interrupt for it (lost or withheld): take it
                // now, as the data queue's watchdog does, instead of waiting out the timeout.
                self.stats.replies_polled += 1;
                self.irq.raise();
                continue;
            }
            if !waited {
                // Spec 5.x.6.8: the reply may be there with its interrupt lost.
                self.irq.raise();
                self.service();
                if let Some(reply) = self.command_reply.take() {
                    self.stats.replies_after_timeout += 1;
                    return reply;
                }
                if self.ring_corrupt {
                    return Err(DriverError::NeedsReset);
                }
                // The command stays queued (its buffers are reclaimed when it completes, or
                // at the reset recovery does); a device that does not answer must be reset.
                self.note_violation(Violation::ReplyMissing);
                self.needs_reset = true;
                return Err(DriverError::Timeout);
            }
        }
    }

    /// Sends a command that must succeed; returns its reply payload.
    pub fn command(
        &mut self,
        op: Opcode,
        payload: &[u8],
        wait: &mut impl Wait,
    ) -> Result<Vec<u8>, DriverError> {
        match self.command_raw(op.code(), payload, wait)? {
            (status, reply) if status == CommandStatus::Ok.code() => Ok(reply),
            (status, _) => Err(DriverError::Command { opcode: op, status }),
        }
    }

    /// START. Logs a warning when the reads posted hold fewer frames than
    /// [`Self::frames_to_keep_posted`] (the FIFO can overrun).
    pub fn start(&mut self, wait: &mut impl Wait) -> Result<(), DriverError> {
        let (posted, needed) = (self.posted_frames(), self.frames_to_keep_posted());
        if posted < needed {
            log::warn!("START with room for {posted} frames posted, {needed} needed");
        }
        self.command(Opcode::Start, &[], wait).map(drop)
    }

    /// TRIGGER (needs VIRTIO_DAQ_F_TRIGGER).
    pub fn trigger(&mut self, wait: &mut impl Wait) -> Result<(), DriverError> {
        self.command(Opcode::Trigger, &[], wait).map(drop)
    }

    /// SET_TRIGGER (needs VIRTIO_DAQ_F_TRIGGER); its reserved field is sent as zero.
    pub fn set_trigger(
        &mut self,
        trigger: &TriggerConfig,
        wait: &mut impl Wait,
    ) -> Result<(), DriverError> {
        let trigger = TriggerConfig {
            reserved: 0,
            ..*trigger
        };
        self.command(Opcode::SetTrigger, trigger.as_bytes(), wait)
            .map(drop)
    }

    /// STOP.
    pub fn stop(&mut self, wait: &mut impl Wait) -> Result<(), DriverError> {
        self.command(Opcode::Stop, &[], wait).map(drop)
    }

    /// CONFIGURE (device must be stopped); refreshes the settings and the frame size.
    ///
    /// The settings are first checked against the limits the configuration space states
    /// (read now): a setting beyond them is [`DriverError::OutOfRange`] and nothing is sent.
    /// Reserved fields are sent as zero.
    ///
    /// On a stopped device with reads in flight it first moves out what the device still
    /// holds, as the spec asks: FLUSH while GET_STATUS reports frames pending (5.x.6.6: frames
    /// sampled before the STOP go into reads, not across the new settings), and FLUSH before
    /// a frame-size change (5.x.6.2: held reads were sized for the old frame). Frames still
    /// pending when no read is left make the device answer BUSY: post reads and call again.
    pub fn configure(
        &mut self,
        settings: &Configure,
        wait: &mut impl Wait,
    ) -> Result<(), DriverError> {
        let settings = &Configure {
            reserved: [0; 7],
            ..*settings
        };
        let config = self.config()?;
        check_settings(settings, &config).map_err(DriverError::OutOfRange)?;
        if self.in_flight > 0 && config.state == DeviceState::Stopped as u8 {
            if self.status(wait)?.frames_pending.get() > 0 {
                self.flush(wait)?;
            }
            let new_frame_bytes = SampleFormat::from_code(settings.format)
                .map(|format| format.sample_bytes() * usize::from(settings.channels.get()));
            if self.in_flight > 0 && new_frame_bytes != Some(self.frame_bytes) {
                self.flush(wait)?;
            }
        }
        self.command(Opcode::Configure, settings.as_bytes(), wait)?;
        self.refresh_settings().map(drop)
    }

    /// GET_STATUS.
    pub fn status(&mut self, wait: &mut impl Wait) -> Result<Status, DriverError> {
        let reply = self.command(Opcode::GetStatus, &[], wait)?;
        Status::read_from_bytes(&reply[..size_of::<Status>().min(reply.len())])
            .map_err(|_| DriverError::BadReply(opcode::GET_STATUS))
    }

    /// FLUSH: the device returns every held read now. Returns how many it returned.
    pub fn flush(&mut self, wait: &mut impl Wait) -> Result<u32, DriverError> {
        let reply = self.command(Opcode::Flush, &[], wait)?;
        let reply = FlushReply::read_from_bytes(&reply[..size_of::<FlushReply>().min(reply.len())])
            .map_err(|_| DriverError::BadReply(opcode::FLUSH))?;
        // The device put the buffers on the used ring before the reply.
        self.irq.raise();
        self.service();
        Ok(reply.buffers_returned.get())
    }

    /// With the device reset (it touches nothing any more): every read still in flight is
    /// the application's again, as `Reclaimed`; the pending command and the event buffers
    /// are dropped. Returns the reads reclaimed.
    fn reclaim_all(&mut self) -> usize {
        let mut reclaimed = 0;
        for slot in self.table.iter_mut() {
            if let Some(slot) = slot.take() {
                reclaimed += 1;
                self.in_flight -= 1;
                self.completions.push_back(Completion {
                    id: slot.id,
                    buffer: slot.buffer,
                    used_len: 0,
                    outcome: ReadOutcome::Reclaimed,
                });
            }
        }
        self.order.clear();
        self.next_sequence = None;
        self.command = None;
        for slot in &mut self.event_slots {
            slot.take();
        }
        reclaimed
    }

    /// Recovers a device in NEEDS_RESET: reads its counters, resets it (a vhost-user device
    /// returns the reads it holds while its rings stop), takes back every read, and
    /// initialises it again. Reads come back as completions; the device is stopped and has
    /// its power-on settings afterwards.
    pub fn recover(&mut self, wait: &mut impl Wait) -> Result<RecoveryReport, DriverError> {
        let status = if self.command.is_none() && !self.ring_corrupt {
            self.status(wait).ok()
        } else {
            None
        };
        let completed_before = self.completions.len();
        self.transport.set_status(DeviceStatus::empty());
        // The device is reset and touches nothing any more; what it returned before is on
        // the used ring, everything else is ours again.
        self.drain_data();
        let returned = self.completions.len() - completed_before;
        let reclaimed = self.reclaim_all();
        // Initialise again, as after power-on. (A failure from here on leaves the device
        // initialising and the driver in NEEDS_RESET; dropping the driver resets the device.)
        let features = self.transport.begin_init(Features(self.features)).0;
        if !self
            .transport
            .get_status()
            .contains(DeviceStatus::FEATURES_OK)
        {
            self.transport.set_status(DeviceStatus::FAILED);
            return Err(DriverError::FeaturesRefused(features));
        }
        let event_idx = has(features, feature::VIRTIO_F_EVENT_IDX);
        self.data = VirtQueue::new(&mut self.transport, queue::DATA, false, event_idx)?;
        self.control = VirtQueue::new(&mut self.transport, queue::CONTROL, false, event_idx)?;
        self.events = VirtQueue::new(&mut self.transport, queue::EVENT, false, event_idx)?;
        self.transport.finish_init();
        self.features = features;
        self.data_added = 0;
        self.data_added_at_notify = 0;
        self.needs_reset = false;
        self.ring_corrupt = false;
        let config = self.refresh_settings()?;
        if let Err(err) = config.identify() {
            self.transport.set_status(DeviceStatus::FAILED);
            self.note_violation(Violation::ConfigImpossible);
            self.needs_reset = true;
            return Err(DriverError::NotVdaq(err));
        }
        for _ in 0..EVENT_BUFFERS {
            self.post_event_buffer()?;
        }
        self.irq.unmask();
        Ok(RecoveryReport {
            status,
            returned,
            reclaimed,
        })
    }

    /// Stops acquisition, takes every read back from the device (FLUSH), checks the device
    /// holds none, and resets it. The returned reads are in [`Self::next_completion`].
    ///
    /// If the device does not cooperate (a command fails or is never answered, reads do not
    /// come back), the device is reset all the same and every read still in flight comes
    /// back as `Reclaimed`: no request stays pending.
    pub fn shutdown(&mut self, wait: &mut impl Wait) -> Result<ShutdownReport, DriverError> {
        self.shutting_down = true;
        let result = self.drain_for_shutdown(wait);
        // Reset: the device forgets its rings; what it still holds is ours again.
        self.transport.set_status(DeviceStatus::empty());
        self.drain_data();
        let reclaimed = self.reclaim_all();
        if reclaimed > 0 {
            log::warn!("shutdown: {reclaimed} reads taken back after the reset");
        }
        result
    }

    fn drain_for_shutdown(&mut self, wait: &mut impl Wait) -> Result<ShutdownReport, DriverError> {
        let in_flight_at_start = self.in_flight;
        let completed_before = self.completions.len();
        self.stop(wait)?;
        let flush_returned = self.flush(wait)?;
        while self.in_flight > 0 {
            self.service();
            if self.in_flight == 0 {
                break;
            }
            if !wait.wait() {
                // As for a command: look once more before giving up (a lost interrupt).
                self.irq.raise();
                self.service();
                if self.in_flight == 0 {
                    break;
                }
                return Err(DriverError::Timeout);
            }
        }
        let status = self.status(wait)?;
        let returned = self.completions.len() - completed_before;
        Ok(ShutdownReport {
            in_flight_at_start,
            returned,
            flush_returned,
            device_held_after: status.buffers_held.get(),
            status,
        })
    }
}

impl<H: Hal, T: Transport> Drop for DaqDriver<H, T> {
    fn drop(&mut self) {
        // Whatever happened before, the device must not keep using ring and buffer memory
        // that is about to be freed: reset it (a no-op after `shutdown`).
        if !self.transport.get_status().is_empty() {
            self.transport.set_status(DeviceStatus::empty());
        }
    }
}

/// Feature bits as `Transport::begin_init` wants them (a bitflags type over the vdaq and
/// virtio feature bits the driver knows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features(pub u64);

impl bitflags::Flags for Features {
    const FLAGS: &'static [bitflags::Flag<Self>] = &[
        bitflags::Flag::new("DAQ_F_CRC32", Features(1 << feature::DAQ_F_CRC32)),
        bitflags::Flag::new("DAQ_F_TRIGGER", Features(1 << feature::DAQ_F_TRIGGER)),
        bitflags::Flag::new(
            "INDIRECT_DESC",
            Features(1 << feature::VIRTIO_F_INDIRECT_DESC),
        ),
        bitflags::Flag::new("EVENT_IDX", Features(1 << feature::VIRTIO_F_EVENT_IDX)),
        bitflags::Flag::new("VERSION_1", Features(1 << feature::VIRTIO_F_VERSION_1)),
    ];
    type Bits = u64;

    fn bits(&self) -> u64 {
        self.0
    }

    fn from_bits_retain(bits: u64) -> Self {
        Features(bits)
    }
}

impl core::ops::BitAnd for Features {
    type Output = Self;

    fn bitand(self, rhs: Self) -> Self {
        Features(self.0 & rhs.0)
    }
}
