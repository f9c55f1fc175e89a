//! The device side of the fake: reads the driver's split virtqueues in host memory (virtio
//! 1.x, 2.7), takes available chains, writes into their device-writable buffers, and puts
//! entries with any id and length on the used ring — so a test scripts exactly what the
//! "device" answers, including answers a correct device would never give.
//!
//! Every address the driver hands the device is checked against the [`super::hal`] registry
//! before it is touched: ring memory must be live DMA memory, a buffer must be shared with the
//! device in the direction of the access.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{fence, AtomicU32, Ordering};

use super::std::sync::{Mutex, PoisonError};
use vdaq_wire::buffer::{BufferHeader, HEADER_SIZE};
use vdaq_wire::config::DaqConfig;
use vdaq_wire::control::{CommandHeader, ResponseHeader};
use vdaq_wire::event::Event;
use vdaq_wire::queue;
use virtio_drivers::transport::DeviceStatus;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::hal;
use super::transport::{lock, DeviceState, FakeDaqTransport, QueueState};
use crate::irq::{Acknowledge, InterruptLine, IrqState};
use crate::Wait;

/// A split-virtqueue descriptor (virtio 1.x, 2.7.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Descriptor {
    /// Buffer address.
    pub addr: U64,
    /// Buffer length.
    pub len: U32,
    /// `DESC_F_*` bits.
    pub flags: U16,
    /// Next descriptor if `DESC_F_NEXT`.
    pub next: U16,
}

/// Descriptor continues in `next` (virtio 1.x, 2.7.5).
pub const DESC_F_NEXT: u16 = 1;
/// Device-writable buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Buffer holds an indirect descriptor table.
pub const DESC_F_INDIRECT: u16 = 4;

/// Offset of `idx` in the available and the used ring; the rings' entries start after it.
const RING_IDX: u64 = 2;
const RING_ENTRIES: u64 = 4;
/// Bytes of one used-ring element (`le32 id; le32 len`).
const USED_ELEM: u64 = 8;

/// Interrupt-cause bit: a used buffer (virtio-mmio InterruptStatus bit 0).
pub const CAUSE_USED_BUFFER: u32 = 1 << 0;
/// Interrupt-cause bit: a configuration change (bit 1).
pub const CAUSE_CONFIG_CHANGE: u32 = 1 << 1;

fn read_mem(addr: u64, out: &mut [u8]) {
    let ptr = core::ptr::with_exposed_provenance::<u8>(addr as usize);
    // SAFETY: every caller checked `addr..addr + out.len()` against the HAL registry first
    // (live DMA memory; shared with the device if it is a buffer), so the source is allocated
    // and readable; `out` is a distinct Rust buffer, so the two do not overlap; tests are
    // single-threaded, so nothing writes the source concurrently.
    unsafe { core::ptr::copy_nonoverlapping(ptr, out.as_mut_ptr(), out.len()) };
}

fn write_mem(addr: u64, bytes: &[u8]) {
    let ptr = core::ptr::with_exposed_provenance_mut::<u8>(addr as usize);
    // SAFETY: as in `read_mem`: the destination was checked against the registry (live DMA
    // memory, device-writable if a buffer), `bytes` is a distinct Rust buffer, and no other
    // thread accesses the destination meanwhile.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len()) };
}

fn ring_read<T: FromBytes + IntoBytes>(addr: u64, what: &str) -> T {
    let mut value = T::new_zeroed();
    hal::check_dma(addr, size_of::<T>(), what);
    read_mem(addr, value.as_mut_bytes());
    value
}

fn ring_write<T: IntoBytes + Immutable>(addr: u64, value: &T, what: &str) {
    hal::check_dma(addr, size_of::<T>(), what);
    write_mem(addr, value.as_bytes());
}

/// One descriptor chain the device took from an available ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// Queue index.
    pub queue: u16,
    /// Head descriptor index (the id a correct device puts on the used ring).
    pub head: u16,
    /// The descriptors, in chain order.
    pub descriptors: Vec<Descriptor>,
}

impl Chain {
    fn parts(&self, writable: bool) -> impl Iterator<Item = &Descriptor> {
        self.descriptors
            .iter()
            .filter(move |d| (d.flags.get() & DESC_F_WRITE != 0) == writable)
    }

    /// Bytes in device-readable descriptors.
    pub fn readable_len(&self) -> usize {
        self.parts(false).map(|d| d.len.get() as usize).sum()
    }

    /// Bytes in device-writable descriptors.
    pub fn writable_len(&self) -> usize {
        self.parts(true).map(|d| d.len.get() as usize).sum()
    }

    /// Whether every readable descriptor comes before every writable one (virtio 1.x, 2.7.4).
    pub fn is_well_ordered(&self) -> bool {
        let mut seen_writable = false;
        for d in &self.descriptors {
            let writable = d.flags.get() & DESC_F_WRITE != 0;
            if seen_writable && !writable {
                return false;
            }
            seen_writable |= writable;
        }
        true
    }

    /// Copies out the device-readable part.
    pub fn read_readable(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for d in self.parts(false) {
            let len = d.len.get() as usize;
            hal::check_shared(d.addr.get(), len, false, "a readable descriptor");
            let start = out.len();
            out.resize(start + len, 0);
            read_mem(d.addr.get(), &mut out[start..]);
        }
        out
    }

    /// Copies out the device-writable part (what the device wrote into it so far).
    pub fn read_writable(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for d in self.parts(true) {
            let len = d.len.get() as usize;
            hal::check_shared(d.addr.get(), len, true, "a writable descriptor");
            let start = out.len();
            out.resize(start + len, 0);
            read_mem(d.addr.get(), &mut out[start..]);
        }
        out
    }

    /// Writes `bytes` at `offset` of the device-writable part, across descriptor boundaries,
    /// never past its end. Returns the bytes written.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> usize {
        let mut skip = offset;
        let mut rest = bytes;
        for d in self.parts(true) {
            if rest.is_empty() {
                break;
            }
            let len = d.len.get() as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = rest.len().min(len - skip);
            let addr = d.addr.get() + skip as u64;
            hal::check_shared(addr, n, true, "a writable descriptor");
            write_mem(addr, &rest[..n]);
            rest = &rest[n..];
            skip = 0;
        }
        bytes.len() - rest.len()
    }
}

/// A command the device took from the control queue.
#[derive(Clone, Debug)]
pub struct Command {
    /// The chain it came in.
    pub chain: Chain,
    /// Its header.
    pub header: CommandHeader,
    /// Its payload (the readable bytes after the header).
    pub payload: Vec<u8>,
}

impl Command {
    /// Opcode.
    pub fn opcode(&self) -> u32 {
        self.header.opcode.get()
    }
}

/// An interrupt line that counts masks and unmasks and can run a hook on the next unmask
/// (to put a completion on a ring in the window the bottom half's re-check closes).
#[derive(Default)]
pub struct FakeLine {
    masked: core::sync::atomic::AtomicBool,
    masks: AtomicU32,
    unmasks: AtomicU32,
    on_unmask: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl core::fmt::Debug for FakeLine {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FakeLine")
            .field("masked", &self.masked)
            .field("masks", &self.masks)
            .field("unmasks", &self.unmasks)
            .finish_non_exhaustive()
    }
}

impl InterruptLine for FakeLine {
    fn mask(&self) {
        self.masked.store(true, Ordering::SeqCst);
        self.masks.fetch_add(1, Ordering::SeqCst);
    }

    fn unmask(&self) {
        self.masked.store(false, Ordering::SeqCst);
        self.unmasks.fetch_add(1, Ordering::SeqCst);
        let hook = self
            .on_unmask
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(hook) = hook {
            hook();
        }
    }
}

impl FakeLine {
    /// Whether the line is masked now.
    pub fn is_masked(&self) -> bool {
        self.masked.load(Ordering::SeqCst)
    }

    /// Unmasks so far.
    pub fn unmasks(&self) -> u32 {
        self.unmasks.load(Ordering::SeqCst)
    }
}

/// The InterruptStatus / InterruptACK register pair the driver's top half reads and writes
/// (virtio-mmio style), in leaked host memory.
#[derive(Debug, Default)]
struct Registers {
    status: AtomicU32,
    ack: AtomicU32,
}

/// The test's handle on the fake device: its transport state, its interrupt, its rings.
/// Cheap to clone; every clone is the same device.
#[derive(Clone, Debug)]
pub struct FakeDevice {
    state: Arc<Mutex<DeviceState>>,
    irq: &'static IrqState,
    line: &'static FakeLine,
    registers: &'static Registers,
}

impl FakeDevice {
    /// A device offering `features` with configuration `config`, and the transport the driver
    /// gets. The interrupt state is leaked (the driver wants `&'static`), a few bytes per test.
    pub fn new(features: u64, config: &DaqConfig) -> (FakeDevice, FakeDaqTransport) {
        Self::with_config_bytes(features, config.as_bytes().to_vec())
    }

    /// As [`Self::new`] with raw configuration bytes (e.g. a truncated space).
    pub fn with_config_bytes(features: u64, config: Vec<u8>) -> (FakeDevice, FakeDaqTransport) {
        let state = Arc::new(Mutex::new(DeviceState::new(features, config)));
        let registers: &'static Registers = Box::leak(Box::default());
        let line: &'static FakeLine = Box::leak(Box::default());
        let acknowledge = Acknowledge::Mmio {
            status: registers.status.as_ptr() as usize,
            ack: registers.ack.as_ptr() as usize,
        };
        // SAFETY: the two addresses are the leaked `registers`, valid and 4-byte aligned for
        // the rest of the process, which is what the top half reads and writes.
        let irq = unsafe { IrqState::new(acknowledge, line) };
        let irq: &'static IrqState = Box::leak(Box::new(irq));
        let device = FakeDevice {
            state: state.clone(),
            irq,
            line,
            registers,
        };
        (device, FakeDaqTransport::new(state))
    }

    /// The interrupt state to give the driver.
    pub fn irq(&self) -> &'static IrqState {
        self.irq
    }

    /// The interrupt line the top half masks.
    pub fn line(&self) -> &'static FakeLine {
        self.line
    }

    /// Runs `f` on the transport-visible state.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut DeviceState) -> R) -> R {
        f(&mut lock(&self.state))
    }

    /// Device status now.
    pub fn status(&self) -> DeviceStatus {
        self.with_state(|s| s.status)
    }

    /// Changes the configuration space (as the device's firmware would).
    pub fn set_config(&self, f: impl FnOnce(&mut DaqConfig)) {
        self.with_state(|s| {
            let mut config =
                DaqConfig::read_from_bytes(&s.config).expect("the config space is a DaqConfig");
            f(&mut config);
            s.config = config.as_bytes().to_vec();
            s.config_generation += 1;
        });
    }

    /// The queue as set up; panics if the driver has not set it up.
    pub fn queue(&self, index: u16) -> QueueState {
        let queue = self.with_state(|s| s.queues[usize::from(index)]);
        assert_ne!(queue.size, 0, "queue {index} is not set up");
        queue
    }

    /// Raises an interrupt with `cause` bits: the top half runs as a handler would.
    pub fn interrupt(&self, cause: u32) {
        self.with_state(|s| s.interrupt_status |= cause);
        self.registers.status.fetch_or(cause, Ordering::SeqCst);
        self.irq.top_half();
        // The top half acknowledged what it saw.
        let acked = self.registers.ack.swap(0, Ordering::SeqCst);
        self.registers.status.fetch_and(!acked, Ordering::SeqCst);
    }

    /// Available chains the device has not taken yet on `index`.
    pub fn avail_pending(&self, index: u16) -> u16 {
        let queue = self.queue(index);
        let idx: U16 = ring_read(queue.driver_area + RING_IDX, "avail.idx");
        idx.get().wrapping_sub(queue.last_avail)
    }

    /// Takes the next available chain on `index`, or None if the driver made none available.
    pub fn take_avail(&self, index: u16) -> Option<Chain> {
        let queue = self.queue(index);
        if self.avail_pending(index) == 0 {
            return None;
        }
        fence(Ordering::SeqCst);
        let size = queue.size as u16;
        let slot = u64::from(queue.last_avail % size);
        let head: U16 = ring_read(
            queue.driver_area + RING_ENTRIES + 2 * slot,
            "an avail ring entry",
        );
        let head = head.get();
        let mut descriptors = Vec::new();
        let mut index_in_table = head;
        loop {
            assert!(
                index_in_table < size,
                "descriptor index {index_in_table} beyond the table of {size}"
            );
            assert!(
                descriptors.len() < usize::from(size),
                "descriptor chain from {head} loops"
            );
            let d: Descriptor = ring_read(
                queue.descriptors + 16 * u64::from(index_in_table),
                "a descriptor",
            );
            assert_eq!(
                d.flags.get() & DESC_F_INDIRECT,
                0,
                "indirect descriptor, but VIRTIO_F_INDIRECT_DESC is never negotiated"
            );
            descriptors.push(d);
            if d.flags.get() & DESC_F_NEXT == 0 {
                break;
            }
            index_in_table = d.next.get();
        }
        self.with_state(|s| {
            let q = &mut s.queues[usize::from(index)];
            q.last_avail = q.last_avail.wrapping_add(1);
        });
        Some(Chain {
            queue: index,
            head,
            descriptors,
        })
    }

    /// Puts `(id, len)` on the used ring of `index` and publishes it. No interrupt.
    pub fn put_used(&self, index: u16, id: u32, len: u32) {
        let queue = self.queue(index);
        let slot = u64::from(queue.used_idx % queue.size as u16);
        let element = [U32::new(id), U32::new(len)];
        ring_write(
            queue.device_area + RING_ENTRIES + USED_ELEM * slot,
            &element,
            "a used ring entry",
        );
        // The element must be visible before the index that publishes it.
        fence(Ordering::SeqCst);
        let used_idx = queue.used_idx.wrapping_add(1);
        ring_write(
            queue.device_area + RING_IDX,
            &U16::new(used_idx),
            "used.idx",
        );
        self.with_state(|s| s.queues[usize::from(index)].used_idx = used_idx);
    }

    /// Moves queue `index`'s used index `count` entries on with nothing written (a device
    /// breaking the ring: the driver meets stale entries).
    pub fn jump_used_index(&self, index: u16, count: u16) {
        let queue = self.queue(index);
        let used_idx = queue.used_idx.wrapping_add(count);
        ring_write(
            queue.device_area + RING_IDX,
            &U16::new(used_idx),
            "used.idx",
        );
        self.with_state(|s| s.queues[usize::from(index)].used_idx = used_idx);
    }

    /// Returns `chain` with used length `len` (the correct id: its head).
    pub fn complete(&self, chain: &Chain, len: u32) {
        self.put_used(chain.queue, u32::from(chain.head), len);
    }

    /// Takes the next read buffer; panics if there is none.
    pub fn take_read(&self) -> Chain {
        self.take_avail(queue::DATA)
            .expect("the driver made a read buffer available")
    }

    /// Writes `header` and then `payload` into a read buffer; returns the bytes written.
    pub fn fill_read(&self, chain: &Chain, header: &BufferHeader, payload: &[u8]) -> usize {
        let written = chain.write(0, header.as_bytes());
        written + chain.write(HEADER_SIZE, payload)
    }

    /// Takes the next command; panics if there is none.
    pub fn take_command(&self) -> Command {
        let chain = self
            .take_avail(queue::CONTROL)
            .expect("the driver made a command available");
        let bytes = chain.read_readable();
        let (header, payload) =
            CommandHeader::read_from_prefix(&bytes).expect("a command starts with its header");
        Command {
            chain,
            header,
            payload: payload.to_vec(),
        }
    }

    /// Answers `command` like a correct device: a [`ResponseHeader`] with `status`, then
    /// `payload`; used length = what was written; interrupt.
    pub fn reply(&self, command: &Command, status: u32, payload: &[u8]) {
        self.reply_without_interrupt(command, status, payload);
        self.interrupt(CAUSE_USED_BUFFER);
    }

    /// Answers `command` like [`Self::reply`], but the interrupt is lost: the reply is on the
    /// used ring and nothing tells the driver.
    pub fn reply_without_interrupt(&self, command: &Command, status: u32, payload: &[u8]) {
        let mut bytes = ResponseHeader {
            status: status.into(),
            reserved: 0.into(),
        }
        .as_bytes()
        .to_vec();
        bytes.extend_from_slice(payload);
        let written = command.chain.write(0, &bytes);
        self.complete(&command.chain, written as u32);
    }

    /// Answers `command` with arbitrary `bytes` and an arbitrary used length `used_len` (which
    /// may lie); interrupt.
    pub fn reply_raw(&self, command: &Command, bytes: &[u8], used_len: u32) {
        command.chain.write(0, bytes);
        self.complete(&command.chain, used_len);
        self.interrupt(CAUSE_USED_BUFFER);
    }

    /// Takes the next event buffer; panics if there is none.
    pub fn take_event_buffer(&self) -> Chain {
        self.take_avail(queue::EVENT)
            .expect("the driver made an event buffer available")
    }

    /// Writes `event` into the next event buffer and returns it with used length
    /// `used_len`; interrupt.
    pub fn send_event(&self, event: &Event, used_len: u32) {
        let chain = self.take_event_buffer();
        chain.write(0, event.as_bytes());
        self.complete(&chain, used_len);
        self.interrupt(CAUSE_USED_BUFFER);
    }

    /// Runs `hook` at the next reset, before the device forgets its queues.
    pub fn on_reset(&self, hook: impl FnOnce() + Send + 'static) {
        self.with_state(|s| s.on_reset.0 = Some(Box::new(hook)));
    }

    /// Runs `hook` the next time the driver unmasks the interrupt line.
    pub fn on_next_unmask(&self, hook: impl FnOnce() + Send + 'static) {
        *self
            .line
            .on_unmask
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(hook));
    }
}

/// One scripted step of the device, run when the driver waits.
pub type Step = Box<dyn FnMut(&FakeDevice)>;

/// A [`Wait`] that plays a script: each `wait()` runs the next step (the device doing
/// something, usually answering and interrupting) and returns true; a [`FakeWait::time_out`]
/// step and the end of the script return false, as a deadline passing.
pub struct FakeWait {
    device: FakeDevice,
    /// What the device does at each wait, and whether that wait gives up.
    steps: VecDeque<(Option<Step>, bool)>,
    /// `wait()` calls so far.
    pub waits: usize,
}

impl core::fmt::Debug for FakeWait {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FakeWait")
            .field("steps_left", &self.steps.len())
            .field("waits", &self.waits)
            .finish_non_exhaustive()
    }
}

impl FakeWait {
    /// An empty script: the first wait times out.
    pub fn new(device: &FakeDevice) -> Self {
        FakeWait {
            device: device.clone(),
            steps: VecDeque::new(),
            waits: 0,
        }
    }

    /// Adds a step.
    pub fn then(mut self, step: impl FnMut(&FakeDevice) + 'static) -> Self {
        self.steps.push_back((Some(Box::new(step)), false));
        self
    }

    /// Adds a step where the device does something and the wait gives up all the same (the
    /// deadline passes as the device acts).
    pub fn then_time_out(mut self, step: impl FnMut(&FakeDevice) + 'static) -> Self {
        self.steps.push_back((Some(Box::new(step)), true));
        self
    }

    /// Adds a step where the wait gives up (its deadline passes) and the device does nothing;
    /// the script goes on at the next wait.
    pub fn time_out(mut self) -> Self {
        self.steps.push_back((None, true));
        self
    }

    /// Adds a step that answers the next command with `status` and `payload`, checking that
    /// it is `opcode`.
    pub fn answer(self, opcode: u32, status: u32, payload: &[u8]) -> Self {
        let payload = payload.to_vec();
        self.then(move |device| {
            let command = device.take_command();
            assert_eq!(command.opcode(), opcode, "the driver sent another command");
            device.reply(&command, status, &payload);
        })
    }

    /// Steps not run yet.
    pub fn steps_left(&self) -> usize {
        self.steps.len()
    }
}

impl Wait for FakeWait {
    fn wait(&mut self) -> bool {
        self.waits += 1;
        match self.steps.pop_front() {
            Some((step, gives_up)) => {
                if let Some(mut step) = step {
                    step(&self.device);
                }
                !gives_up
            }
            None => false,
        }
    }
}
