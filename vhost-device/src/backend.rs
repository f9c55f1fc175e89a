//! vhost-user plumbing: turns vrings, kicks and timer ticks into calls on the [`Card`] model,
//! and completions back into used-ring entries and interrupts.
//!
//! Everything read from guest memory is treated as hostile: descriptor chains are validated
//! completely before the device writes a single byte, malformed requests get the answer the
//! specification defines (a status code, or used length 0), and nothing here panics on guest
//! input.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use thiserror::Error;
use vdaq_wire::buffer::{BufferHeader, HEADER_SIZE, MAX_CHAIN_DESCRIPTORS};
use vdaq_wire::config::CONFIG_SIZE;
use vdaq_wire::control::{self, CommandHeader, ResponseHeader};
use vdaq_wire::event::{fault, EVENT_SIZE};
use vdaq_wire::zerocopy::{FromBytes, IntoBytes};
use vdaq_wire::{feature, queue};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic,
    GuestMemoryLoadGuard, GuestMemoryMmap, Permissions,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::model::{BufferWriteError, Card, Completion, Limits, ReadBuffer, Settings};

/// Guest memory as the backend sees it.
pub type GuestMemoryHandle = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type MemorySnapshot = GuestMemoryLoadGuard<GuestMemoryMmap<()>>;

/// Epoll token of the sample-clock timer. Tokens up to `queue::COUNT` belong to the queues and
/// the library's exit event.
pub const TIMER_EVENT: u16 = queue::COUNT + 1;

/// Largest control request (header + payload) the device reads; larger ones are BAD_SIZE.
const MAX_COMMAND_BYTES: usize = 4096;

/// Errors of this module that end the backend's setup (never caused by the guest).
#[derive(Debug, Error)]
pub enum BackendError {
    /// The device model refused the power-on settings.
    #[error("invalid device settings: {0}")]
    Settings(#[from] crate::model::SettingsError),
    /// A timer or event fd could not be created.
    #[error("cannot create {what}: {source}")]
    Fd {
        /// Which fd.
        what: &'static str,
        /// OS error.
        source: io::Error,
    },
}

/// What is wrong with a descriptor chain the guest made available.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainError {
    /// A device-readable descriptor where only device-writable ones may be.
    #[error("device-readable descriptor in a device-writable buffer")]
    WrongDirection,
    /// A device-readable descriptor after a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor's address range is not (entirely) guest memory.
    #[error("descriptor outside guest memory")]
    OutOfBounds,
    /// The chain loops, points past the table, or has a bad indirect table.
    #[error("broken descriptor chain (loop, bad next index or bad indirect table)")]
    Broken,
    /// More descriptors than the device accepts.
    #[error("more than {MAX_CHAIN_DESCRIPTORS} descriptors in one chain")]
    TooManyDescriptors,
    /// More bytes than a used length can describe (4 GiB).
    #[error("chain longer than 4 GiB")]
    TooLong,
    /// A buffer whose descriptor head the device already holds (the driver reused it).
    #[error("buffer made available again while the device still holds it")]
    AlreadyHeld,
    /// Not even room for the header.
    #[error("chain too short for the header")]
    TooShort,
}

/// One contiguous piece of a descriptor chain in guest memory.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// Device-readable and device-writable parts of a validated chain.
#[derive(Debug, Default)]
struct ChainLayout {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

impl ChainLayout {
    fn writable_bytes(&self) -> usize {
        self.writable.iter().map(|s| s.len).sum()
    }

    fn readable_bytes(&self) -> usize {
        self.readable.iter().map(|s| s.len).sum()
    }
}

/// Walks `chain`, checking every descriptor before anything is written: direction order
/// (readable first), bounds, length, and that the chain ended where its last descriptor says.
fn validate_chain(
    chain: DescriptorChain<MemorySnapshot>,
    mem: &GuestMemoryMmap<()>,
) -> Result<ChainLayout, ChainError> {
    let mut layout = ChainLayout::default();
    let mut count = 0;
    let mut total: u64 = 0;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        let len = desc.len() as usize;
        total += u64::from(desc.len());
        if total > u64::from(u32::MAX) {
            return Err(ChainError::TooLong);
        }
        let access = if desc.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if len > 0 && !mem.check_range(desc.addr(), len, access) {
            return Err(ChainError::OutOfBounds);
        }
        let segment = Segment {
            addr: desc.addr(),
            len,
        };
        if desc.is_write_only() {
            layout.writable.push(segment);
        } else if layout.writable.is_empty() {
            layout.readable.push(segment);
        } else {
            return Err(ChainError::ReadableAfterWritable);
        }
        last_has_next = desc.has_next();
    }
    // The iterator stops early, without an error, on loops, out-of-range next indices and bad
    // indirect tables; a last descriptor that still claims a successor gives it away.
    if count == 0 || last_has_next {
        return Err(ChainError::Broken);
    }
    Ok(layout)
}

/// The pieces of bytes `offset .. offset + len` of the area made of `segments`: for each, where
/// it starts in guest memory and which bytes of the `len` it covers. None if the area is too
/// small, so callers touch nothing. Allocation-free: it runs for every block written.
fn segment_pieces(
    segments: &[Segment],
    offset: usize,
    len: usize,
) -> Option<impl Iterator<Item = Option<(GuestAddress, std::ops::Range<usize>)>> + '_> {
    let total: usize = segments.iter().map(|s| s.len).sum();
    if offset.checked_add(len)? > total {
        return None;
    }
    let mut skip = offset;
    let mut done = 0;
    Some(segments.iter().filter_map(move |segment| {
        if done == len {
            return None;
        }
        if skip >= segment.len {
            skip -= segment.len;
            return None;
        }
        let n = (segment.len - skip).min(len - done);
        // An address overflow yields None inside: the caller fails.
        let piece = segment
            .addr
            .checked_add(skip as u64)
            .map(|addr| (addr, done..done + n));
        done += n;
        skip = 0;
        Some(piece)
    }))
}

/// Writes `data` at byte `offset` of the area made of `segments`. Fails without writing
/// anything if the area is too small.
fn write_segments(
    mem: &GuestMemoryMmap<()>,
    segments: &[Segment],
    offset: usize,
    data: &[u8],
) -> Result<(), BufferWriteError> {
    let error = BufferWriteError {
        offset,
        len: data.len(),
    };
    let pieces =
        segment_pieces(segments, offset, data.len()).ok_or(BufferWriteError { ..error })?;
    for piece in pieces {
        let (addr, range) = piece.ok_or(BufferWriteError { ..error })?;
        mem.write_slice(&data[range], addr)
            .map_err(|_| BufferWriteError { ..error })?;
    }
    Ok(())
}

/// A read buffer posted on the data queue, validated, in guest memory.
#[derive(Debug)]
pub struct GuestBuffer {
    head: u16,
    writable: Vec<Segment>,
    capacity: usize,
    mem: GuestMemoryHandle,
}

impl ReadBuffer for GuestBuffer {
    fn payload_capacity(&self) -> usize {
        self.capacity - HEADER_SIZE
    }

    fn write_payload(&mut self, offset: usize, data: &[u8]) -> Result<(), BufferWriteError> {
        let mem = self.mem.memory();
        write_segments(&mem, &self.writable, HEADER_SIZE + offset, data)
    }

    fn write_header(&mut self, header: &BufferHeader) -> Result<(), BufferWriteError> {
        let mem = self.mem.memory();
        write_segments(&mem, &self.writable, 0, header.as_bytes())
    }
}

/// Logs each kind of guest error once at warning level, then at debug level, so a hostile or
/// broken guest cannot flood the log.
#[derive(Debug, Default)]
struct GuestErrorLog {
    seen: std::collections::HashSet<String>,
}

/// Distinct guest-error messages logged at warning level per connection: messages can carry
/// guest-chosen values, so the set is bounded; past it everything goes to debug level.
const MAX_WARNED_GUEST_ERRORS: usize = 64;

impl GuestErrorLog {
    fn report(&mut self, queue_name: &str, what: impl std::fmt::Display) {
        let message = format!("{queue_name} queue: {what}");
        if self.seen.len() < MAX_WARNED_GUEST_ERRORS && self.seen.insert(message.clone()) {
            warn!("{message} (further reports of this kind at debug level)");
        } else {
            debug!("{message}");
        }
    }
}

/// Appends delivered buffers (header and payload, exactly as the driver got them) to a
/// recording file: `VDAQREC1` then the buffers back to back (`model::source` reads it).
struct Recorder {
    file: std::io::BufWriter<std::fs::File>,
    scratch: Vec<u8>,
    failed: bool,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    fn open(path: &std::path::Path) -> io::Result<Self> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if file.metadata()?.len() == 0 {
            file.write_all(crate::model::source::RECORDING_MAGIC)?;
        }
        Ok(Recorder {
            file: std::io::BufWriter::new(file),
            scratch: Vec::new(),
            failed: false,
        })
    }

    fn record(&mut self, buffer: &GuestBuffer, used: usize) {
        use std::io::Write;
        /// Bytes copied per step: the buffer is streamed to the file, never held whole.
        const CHUNK: usize = 64 * 1024;
        if self.failed || used < HEADER_SIZE {
            return;
        }
        let mem = buffer.mem.memory();
        let mut header = [0u8; HEADER_SIZE];
        if read_segments(&mem, &buffer.writable, 0, &mut header).is_err()
            || header[46] != vdaq_wire::buffer::status::OK
        {
            // Only buffers with status OK: rejected ones carry nothing to replay.
            return;
        }
        self.scratch.resize(CHUNK, 0);
        let mut offset = 0;
        while offset < used {
            let n = CHUNK.min(used - offset);
            let chunk = &mut self.scratch[..n];
            if read_segments(&mem, &buffer.writable, offset, chunk).is_err() {
                return;
            }
            if let Err(err) = self.file.write_all(chunk) {
                warn!("recording stopped: {err}");
                self.failed = true;
                return;
            }
            offset += n;
        }
    }
}

impl Recorder {
    fn flush(&mut self) {
        use std::io::Write;
        if let Err(err) = self.file.flush() {
            warn!("recording: {err}");
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Reads `out.len()` bytes from byte `offset` of the area made of `segments`.
fn read_segments(
    mem: &GuestMemoryMmap<()>,
    segments: &[Segment],
    offset: usize,
    out: &mut [u8],
) -> Result<(), ()> {
    for piece in segment_pieces(segments, offset, out.len()).ok_or(())? {
        let (addr, range) = piece.ok_or(())?;
        mem.read_slice(&mut out[range], addr).map_err(|_| ())?;
    }
    Ok(())
}

/// A device-writable buffer posted on the event queue.
#[derive(Debug)]
struct EventSlot {
    head: u16,
    writable: Vec<Segment>,
}

/// Options of one device instance that are not acquisition settings.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Power-on acquisition settings.
    pub settings: Settings,
    /// Card limits (FIFO depth, rate range, channels).
    pub limits: Limits,
    /// Largest virtqueue size offered.
    pub queue_size: u16,
    /// Period of the device's sample-clock tick.
    pub tick: Duration,
    /// Scripted firmware behaviour, if any.
    pub scenario: Option<std::sync::Arc<crate::model::scenario::Scenario>>,
    /// Virtual sample time (see `Card::set_deterministic`).
    pub deterministic: bool,
    /// Samples for the `file` signal.
    pub source: Option<std::sync::Arc<crate::model::source::FileSource>>,
    /// Where to record every delivered buffer.
    pub record: Option<std::path::PathBuf>,
}

/// The vhost-user backend of one vdaq device.
pub struct DaqBackend {
    card: Card<GuestBuffer>,
    options: DeviceOptions,
    mem: Option<GuestMemoryHandle>,
    event_idx: bool,
    acked_features: u64,
    epoch: Instant,
    timer: TimerFd,
    timer_armed: bool,
    exit_consumer: EventConsumer,
    exit_notifier: EventNotifier,
    frontend: Option<Backend>,
    vrings: Vec<VringRwLock>,
    event_slots: VecDeque<EventSlot>,
    completions: Vec<Completion<GuestBuffer>>,
    errors: GuestErrorLog,
    /// Bit n set: queue n was stopped (GET_VRING_BASE) since the last reset.
    stopped_queues: u8,
    /// Appends every delivered buffer to a recording, if asked to.
    recorder: Option<Recorder>,
    /// Completed buffers held back by a scripted delay, oldest first.
    delayed: Vec<Completion<GuestBuffer>>,
    /// Descriptor heads of read buffers the device holds (a head made available again while
    /// held means the ring is corrupt, and holding it twice would grow without bound).
    held_reads: std::collections::HashSet<u16>,
    /// The driver was told about NEEDS_RESET (config-change notification sent).
    needs_reset_notified: bool,
    /// Closes this connection (a scenario's `disconnect`).
    connection: Option<vhost_user_backend::ShutdownHandle>,
}

impl std::fmt::Debug for DaqBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaqBackend")
            .field("card", &self.card)
            .field("event_idx", &self.event_idx)
            .finish_non_exhaustive()
    }
}

impl DaqBackend {
    /// A backend for one device with the given options.
    pub fn new(options: DeviceOptions) -> Result<Self, BackendError> {
        let mut card = Card::new(options.settings, options.limits)?;
        if let Some(scenario) = &options.scenario {
            card.set_scenario(scenario.as_ref().clone());
        }
        card.set_deterministic(options.deterministic);
        if let Some(source) = &options.source {
            card.set_source(source.clone());
        }
        let recorder = match &options.record {
            None => None,
            Some(path) => Some(Recorder::open(path).map_err(|source| BackendError::Fd {
                what: "recording file",
                source,
            })?),
        };
        let timer = TimerFd::new().map_err(|source| BackendError::Fd {
            what: "sample-clock timer",
            source: io::Error::from_raw_os_error(source.errno()),
        })?;
        set_nonblocking(&timer).map_err(|source| BackendError::Fd {
            what: "sample-clock timer",
            source,
        })?;
        let (exit_consumer, exit_notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)
            .map_err(|source| BackendError::Fd {
            what: "exit event",
            source,
        })?;
        Ok(DaqBackend {
            card,
            options,
            mem: None,
            event_idx: false,
            acked_features: 0,
            epoch: Instant::now(),
            timer,
            timer_armed: false,
            exit_consumer,
            exit_notifier,
            frontend: None,
            vrings: Vec::new(),
            event_slots: VecDeque::new(),
            completions: Vec::new(),
            errors: GuestErrorLog::default(),
            stopped_queues: 0,
            held_reads: std::collections::HashSet::new(),
            recorder,
            delayed: Vec::new(),
            needs_reset_notified: false,
            connection: None,
        })
    }

    /// Applies a scripted action now (control socket).
    pub fn inject(&mut self, action: crate::model::scenario::Action) {
        let now = self.now_ns();
        self.card.apply(action, now);
        // Take effect now (events, NEEDS_RESET, disconnect), not at the guest's next kick.
        if !self.vrings.is_empty() {
            let vrings = self.vrings.clone();
            self.pump(&vrings);
        }
    }

    /// Changes delivery parameters that leave the samples alone (control socket).
    pub fn adjust(
        &mut self,
        latency_us: Option<u32>,
        coalesce_buffers: Option<u16>,
        watermark_frames: Option<u32>,
    ) -> Result<(), String> {
        self.card
            .adjust(latency_us, coalesce_buffers, watermark_frames)
            .map_err(|err| err.to_string())
    }

    /// Takes the next pending device event (tests).
    #[cfg(test)]
    pub fn pop_event_for_tests(&mut self) -> Option<vdaq_wire::event::Event> {
        self.card.pop_event()
    }

    /// Lets the backend close its own connection (scenario `disconnect`).
    pub fn set_connection(&mut self, handle: vhost_user_backend::ShutdownHandle) {
        self.connection = Some(handle);
    }

    /// The sample-clock timer's fd, to register with the daemon's epoll loop as
    /// [`TIMER_EVENT`].
    pub fn timer_fd(&self) -> std::os::fd::RawFd {
        self.timer.as_raw_fd()
    }

    /// The device model (for tests and statistics).
    pub fn card(&self) -> &Card<GuestBuffer> {
        &self.card
    }

    /// Device clock: ns since this backend was created.
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn memory(&self) -> Option<GuestMemoryHandle> {
        self.mem.clone()
    }

    /// Pops every available chain of `vring`, handing each to `take`. Follows the EVENT_IDX
    /// protocol: notifications are off while draining and the ring is re-checked after
    /// turning them back on, so a buffer made available in between is not missed.
    fn drain_available(
        &mut self,
        vring: &VringRwLock,
        queue_name: &'static str,
        mut take: impl FnMut(&mut Self, DescriptorChain<MemorySnapshot>, &GuestMemoryMmap<()>),
    ) -> io::Result<()> {
        let Some(mem_handle) = self.memory() else {
            return Ok(());
        };
        loop {
            if self.event_idx {
                vring.disable_notification().map_err(to_io)?;
            }
            let mem = mem_handle.memory();
            let chains = {
                let mut state = vring.get_mut();
                state
                    .get_queue_mut()
                    .iter(mem_handle.memory())
                    .map(|iter| iter.collect::<Vec<_>>())
            };
            let chains = match chains {
                Ok(chains) => chains,
                // A kick racing the frontend stopping the ring: nothing to do.
                Err(virtio_queue::Error::QueueNotReady) => return Ok(()),
                Err(err) => {
                    // The avail index is nonsense: the ring cannot be trusted any more.
                    self.errors
                        .report(queue_name, format_args!("corrupt ring: {err}"));
                    self.needs_reset(fault::QUEUE_CORRUPT);
                    return Ok(());
                }
            };
            for chain in chains {
                take(self, chain, &mem);
            }
            if !self.event_idx || !vring.enable_notification().map_err(to_io)? {
                return Ok(());
            }
        }
    }

    fn needs_reset(&mut self, fault_code: u32) {
        let now = self.now_ns();
        self.card.enter_needs_reset(fault_code, now);
        self.notify_needs_reset();
    }

    /// Tells the driver, once, that the device entered NEEDS_RESET.
    fn notify_needs_reset(&mut self) {
        if self.needs_reset_notified {
            return;
        }
        self.needs_reset_notified = true;
        if let Some(frontend) = self.frontend.clone() {
            // The virtio status byte belongs to the frontend; a config-change notification
            // makes the driver read `state` and see NEEDS_RESET (see the spec). Sent from its
            // own thread: with REPLY_ACK the send waits for the frontend, which may itself be
            // waiting for a GET_CONFIG that needs this backend's lock.
            let sent = std::thread::Builder::new()
                .name("vdaq config-change".into())
                .spawn(move || {
                    // QEMU's generic vhost-user device (11.1) answers ENOSYS: it does not
                    // forward the notification; the NEEDS_RESET event still reaches the driver.
                    if let Err(err) = frontend.handle_config_change() {
                        info!("config-change notification not delivered: {err}");
                    }
                });
            if let Err(err) = sent {
                warn!("cannot send config-change notification: {err}");
            }
        }
    }

    fn process_data_queue(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem_handle) = self.memory() else {
            return Ok(());
        };
        self.drain_available(vring, "data", |this, chain, mem| {
            let head = chain.head_index();
            if this.held_reads.contains(&head) {
                this.errors.report("data", ChainError::AlreadyHeld);
                this.needs_reset(fault::QUEUE_CORRUPT);
                return;
            }
            let buffer = validate_chain(chain, mem).and_then(|layout| {
                if !layout.readable.is_empty() {
                    return Err(ChainError::WrongDirection);
                }
                let capacity = layout.writable_bytes();
                if capacity < HEADER_SIZE {
                    return Err(ChainError::TooShort);
                }
                Ok(GuestBuffer {
                    head,
                    writable: layout.writable,
                    capacity,
                    mem: mem_handle.clone(),
                })
            });
            match buffer {
                Ok(buffer) => {
                    let now = this.now_ns();
                    this.held_reads.insert(head);
                    this.card.post(buffer, now, &mut this.completions);
                    // Fill and return right away where the clock allows (free-running), so
                    // the driver can consume this buffer while the next one is being filled.
                    this.card.advance(now, &mut this.completions);
                    this.publish_completions(vring, false);
                }
                Err(err) => {
                    this.errors.report("data", err);
                    this.card.count_rejected();
                    if let Err(err) = vring.add_used(head, 0) {
                        this.errors
                            .report("data", format_args!("add_used failed: {err}"));
                    }
                    this.signal(vring);
                }
            }
        })
    }

    fn process_control_queue(&mut self, vrings: &[VringRwLock]) -> io::Result<()> {
        let Some(control_vring) = vrings.get(usize::from(queue::CONTROL)) else {
            return Ok(());
        };
        self.drain_available(control_vring, "control", |this, chain, mem| {
            let head = chain.head_index();
            let used_len = this.execute_command(chain, mem, vrings);
            if let Err(err) = control_vring.add_used(head, used_len) {
                this.errors
                    .report("control", format_args!("add_used failed: {err}"));
            }
            this.signal(control_vring);
        })
    }

    /// Runs one control request; returns the used length of its reply.
    fn execute_command(
        &mut self,
        chain: DescriptorChain<MemorySnapshot>,
        mem: &GuestMemoryMmap<()>,
        vrings: &[VringRwLock],
    ) -> u32 {
        let layout = match validate_chain(chain, mem) {
            Ok(layout) => layout,
            Err(err) => {
                self.errors.report("control", err);
                self.card.count_rejected();
                return 0;
            }
        };
        let reply_space = layout.writable_bytes();
        if reply_space < size_of::<ResponseHeader>() {
            self.errors
                .report("control", "no room for the reply header");
            self.card.count_rejected();
            return 0;
        }
        let reply = |this: &mut Self, status: u32, payload: &[u8]| -> u32 {
            let header = ResponseHeader {
                status: status.into(),
                reserved: 0.into(),
            };
            let mut bytes = header.as_bytes().to_vec();
            bytes.extend_from_slice(payload);
            match write_segments(mem, &layout.writable, 0, &bytes) {
                Ok(()) => bytes.len() as u32,
                Err(err) => {
                    this.errors.report("control", err);
                    0
                }
            }
        };
        let request_len = layout.readable_bytes();
        if request_len < size_of::<CommandHeader>() || request_len > MAX_COMMAND_BYTES {
            self.errors
                .report("control", format_args!("request of {request_len} bytes"));
            self.card.count_rejected();
            return reply(self, control::status::BAD_SIZE, &[]);
        }
        let mut request = vec![0u8; request_len];
        if read_segments(mem, &layout.readable, 0, &mut request).is_err() {
            self.card.count_rejected();
            return reply(self, control::status::BAD_SIZE, &[]);
        }
        let (header_bytes, payload) = request.split_at(size_of::<CommandHeader>());
        let Ok(header) = CommandHeader::read_from_bytes(header_bytes) else {
            return reply(self, control::status::BAD_SIZE, &[]);
        };
        let op = header.opcode.get();
        if control::command_payload_size(op).is_some()
            && reply_space < size_of::<ResponseHeader>() + control::reply_payload_size(op)
        {
            self.errors.report(
                "control",
                format_args!("reply area too small for opcode {op}"),
            );
            self.card.count_rejected();
            return reply(self, control::status::BAD_SIZE, &[]);
        }
        let now = self.now_ns();
        let result = self.card.execute(op, payload, now, &mut self.completions);
        if result.status != control::status::OK {
            self.errors.report(
                "control",
                format_args!("opcode {op} answered with status {}", result.status),
            );
            if matches!(
                result.status,
                control::status::UNSUPPORTED | control::status::BAD_SIZE
            ) {
                self.card.count_rejected();
            }
        }
        // Data buffers completed by this command (STOP, FLUSH) reach the used ring before the
        // reply does, so a driver that sees the reply finds them already returned.
        if let Some(data) = vrings.get(usize::from(queue::DATA)) {
            self.publish_completions(data, true);
        }
        reply(self, result.status, &result.payload)
    }

    fn process_event_queue(&mut self, vring: &VringRwLock) -> io::Result<()> {
        self.drain_available(vring, "event", |this, chain, mem| {
            let head = chain.head_index();
            if this.event_slots.iter().any(|slot| slot.head == head) {
                this.errors.report("event", ChainError::AlreadyHeld);
                this.needs_reset(fault::QUEUE_CORRUPT);
                return;
            }
            match validate_chain(chain, mem) {
                Ok(layout)
                    if layout.readable.is_empty() && layout.writable_bytes() >= EVENT_SIZE =>
                {
                    this.event_slots.push_back(EventSlot {
                        head,
                        writable: layout.writable,
                    });
                }
                Ok(_) => this.reject_event_buffer(vring, head, ChainError::TooShort),
                Err(err) => this.reject_event_buffer(vring, head, err),
            }
        })
    }

    fn reject_event_buffer(&mut self, vring: &VringRwLock, head: u16, err: ChainError) {
        self.errors.report("event", err);
        self.card.count_rejected();
        if let Err(err) = vring.add_used(head, 0) {
            self.errors
                .report("event", format_args!("add_used failed: {err}"));
        }
        self.signal(vring);
    }

    /// Moves pending events into posted event buffers.
    fn deliver_events(&mut self, vring: &VringRwLock) {
        let Some(mem) = self.memory() else {
            return;
        };
        let mem = mem.memory();
        let mut delivered = false;
        while self.card.has_events() && !self.event_slots.is_empty() {
            let (Some(slot), Some(event)) = (self.event_slots.pop_front(), self.card.pop_event())
            else {
                break;
            };
            let used_len = match write_segments(&mem, &slot.writable, 0, event.as_bytes()) {
                Ok(()) => EVENT_SIZE as u32,
                Err(err) => {
                    self.errors.report("event", err);
                    self.card.count_event_lost();
                    0
                }
            };
            if let Err(err) = vring.add_used(slot.head, used_len) {
                self.errors
                    .report("event", format_args!("add_used failed: {err}"));
            }
            delivered = true;
        }
        if delivered {
            self.signal(vring);
        }
    }

    /// Puts completed read buffers on the used ring and notifies the driver when the
    /// coalescing policy (or `force`) says so.
    fn publish_completions(&mut self, vring: &VringRwLock, force: bool) {
        let now = self.now_ns();
        if !force && self.card.completions_delayed(now) {
            // A scripted delay: hold completed buffers back until the window ends.
            self.delayed.append(&mut self.completions);
            return;
        }
        let mut ready = std::mem::take(&mut self.delayed);
        ready.append(&mut self.completions);
        self.completions = ready;
        for completion in self.completions.drain(..) {
            self.held_reads.remove(&completion.buffer.head);
            if let Some(recorder) = &mut self.recorder {
                // Before add_used: the driver cannot have touched the buffer yet.
                recorder.record(&completion.buffer, completion.used_len as usize);
            }
            if let Err(err) = vring.add_used(completion.buffer.head, completion.used_len) {
                self.errors
                    .report("data", format_args!("add_used failed: {err}"));
            }
        }
        let now = self.now_ns();
        if self.card.take_notification(now, force) {
            self.signal(vring);
        }
    }

    /// Notifies the driver if its notification suppression allows it.
    fn signal(&mut self, vring: &VringRwLock) {
        if !self.event_idx && self.driver_suppresses_interrupts(vring) {
            return;
        }
        match vring.needs_notification() {
            Ok(true) => {
                if let Err(err) = vring.signal_used_queue() {
                    debug!("signal_used_queue failed: {err}");
                }
            }
            Ok(false) => {}
            Err(err) => self
                .errors
                .report("used", format_args!("cannot read used_event: {err}")),
        }
    }

    /// Without EVENT_IDX the driver suppresses interrupts with VIRTQ_AVAIL_F_NO_INTERRUPT,
    /// which virtio-queue 0.18 does not honour by itself.
    fn driver_suppresses_interrupts(&self, vring: &VringRwLock) -> bool {
        const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
        let Some(mem) = self.memory() else {
            return false;
        };
        let avail = GuestAddress(vring.get_ref().get_queue().avail_ring());
        mem.memory()
            .read_obj::<u16>(avail)
            .is_ok_and(|flags| u16::from_le(flags) & VIRTQ_AVAIL_F_NO_INTERRUPT != 0)
    }

    /// After any event: advance the card, publish what completed, deliver events, keep the
    /// timer running exactly while the card has time-driven work.
    fn pump(&mut self, vrings: &[VringRwLock]) {
        let now = self.now_ns();
        self.card.advance(now, &mut self.completions);
        if let Some(data) = vrings.get(usize::from(queue::DATA)) {
            self.publish_completions(data, false);
        }
        if let Some(events) = vrings.get(usize::from(queue::EVENT)) {
            self.deliver_events(events);
        }
        if self.card.state() == vdaq_wire::DeviceState::NeedsReset {
            self.notify_needs_reset();
        }
        if self.card.take_disconnect_request() {
            match &self.connection {
                Some(handle) => {
                    warn!("scenario: closing the vhost-user connection");
                    handle.shutdown();
                }
                None => warn!("scenario: disconnect requested but no connection handle"),
            }
        }
        self.update_timer();
    }

    fn update_timer(&mut self) {
        let wanted = self.card.wants_ticks() || !self.delayed.is_empty();
        if wanted == self.timer_armed {
            return;
        }
        let result = if wanted {
            self.timer.reset(self.options.tick, Some(self.options.tick))
        } else {
            self.timer.clear()
        };
        match result {
            Ok(()) => self.timer_armed = wanted,
            Err(err) => warn!(
                "cannot {} the sample-clock timer: {err}",
                if wanted { "arm" } else { "disarm" }
            ),
        }
    }

    fn release_held_buffers(&mut self, reason: &str) {
        let now = self.now_ns();
        let returned = self.card.flush(now, &mut self.completions);
        if returned > 0 {
            info!("{reason}: returned {returned} held read buffers as flushed");
        }
        if let Some(data) = self.vrings.get(usize::from(queue::DATA)).cloned() {
            self.publish_completions(&data, true);
        } else {
            self.completions.clear();
        }
    }
}

fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL on an fd we own reads flags and touches no memory.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on an fd we own only changes its status flags.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn to_io(err: virtio_queue::Error) -> io::Error {
    io::Error::other(err.to_string())
}

impl VhostUserBackendMut for DaqBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(queue::COUNT)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.options.queue_size)
    }

    fn features(&self) -> u64 {
        feature::DEVICE_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.acked_features = features;
        self.card
            .set_crc_enabled(features & (1 << feature::DAQ_F_CRC32) != 0);
        self.card
            .set_trigger_enabled(features & (1 << feature::DAQ_F_TRIGGER) != 0);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&mut self) {
        if let Some(recorder) = &mut self.recorder {
            recorder.flush();
        }
        self.stopped_queues = 0;
        self.needs_reset_notified = false;
        let released = self.card.reset();
        self.delayed.clear();
        self.held_reads.clear();
        self.event_slots.clear();
        self.completions.clear();
        debug!("device reset; {} read buffers released", released.len());
        self.update_timer();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.card.config_space();
        let bytes = config.as_bytes();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= CONFIG_SIZE => bytes[start..end].to_vec(),
            _ => {
                debug!("GET_CONFIG outside the {CONFIG_SIZE}-byte config space: {offset}+{size}");
                Vec::new()
            }
        }
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The configuration space is read-only (settings change through CONFIGURE, which
        // answers with a status); writes are ignored, as the spec says.
        self.errors.report(
            "config",
            format_args!("ignored write of {} bytes at offset {offset}", buf.len()),
        );
        Ok(())
    }

    fn update_memory(&mut self, mem: GuestMemoryHandle) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        self.frontend = Some(backend);
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((
            self.exit_consumer.try_clone().ok()?,
            self.exit_notifier.try_clone().ok()?,
        ))
    }

    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        let all_queues = (1u8 << queue::COUNT) - 1;
        // Buffers the device holds must not outlive the ring: return them before the
        // frontend reads the ring base, so a paused or reset driver gets every one back.
        match u16::try_from(queue_index) {
            Ok(queue::DATA) => self.release_held_buffers("data queue stopped"),
            Ok(queue::EVENT) => {
                if let Some(vring) = self.vrings.get(usize::from(queue::EVENT)).cloned() {
                    while let Some(slot) = self.event_slots.pop_front() {
                        if let Err(err) = vring.add_used(slot.head, 0) {
                            self.errors
                                .report("event", format_args!("add_used failed: {err}"));
                        }
                    }
                    self.signal(&vring);
                }
                self.event_slots.clear();
            }
            _ => {}
        }
        if let Ok(index) = u8::try_from(queue_index) {
            self.stopped_queues |= 1u8.checked_shl(u32::from(index)).unwrap_or(0);
        }
        if self.stopped_queues & all_queues == all_queues {
            // The frontend stopped every ring: the driver reset the device (QEMU's generic
            // vhost-user device sends no reset message of its own), so the card resets too.
            self.stopped_queues = 0;
            self.reset_device();
        }
        self.update_timer();
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if self.vrings.is_empty() {
            self.vrings = vrings.to_vec();
        }
        if evset != EventSet::IN {
            debug!("unexpected event set {evset:?} for event {device_event}");
        }
        let result = match device_event {
            queue::DATA => match vrings.get(usize::from(queue::DATA)) {
                Some(vring) => self.process_data_queue(vring),
                None => Ok(()),
            },
            queue::CONTROL => self.process_control_queue(vrings),
            queue::EVENT => match vrings.get(usize::from(queue::EVENT)) {
                Some(vring) => self.process_event_queue(vring),
                None => Ok(()),
            },
            TIMER_EVENT => {
                // Expiration count is not needed: the card works from the clock, not ticks.
                if let Err(err) = self.timer.wait() {
                    if err.errno() != libc::EAGAIN {
                        debug!("timer read failed: {err}");
                    }
                }
                Ok(())
            }
            other => {
                warn!("unknown device event {other}");
                Ok(())
            }
        };
        if let Err(err) = result {
            // A queue-level failure is the guest's doing; report it and keep serving.
            self.errors
                .report("vring", format_args!("event {device_event}: {err}"));
        }
        self.pump(vrings);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
