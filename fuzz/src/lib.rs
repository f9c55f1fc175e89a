//! The harness the queue targets share: the real backend (`DaqBackend`) over three virtqueues
//! in one guest memory, every byte of which (descriptor tables, rings, buffers) the fuzzer
//! writes as a hostile driver would. virtio-queue's `MockSplitQueue` only lays the rings out;
//! the descriptors and ring indices are the fuzzer's.
//!
//! Input: a stream of operations, each an opcode byte and its arguments (see [`Op`]).
//! After every operation the harness checks what the device must keep true whatever the
//! driver does: the accounting invariant, and that it never puts more on a used ring than
//! was made available.

use std::time::Duration;

use vdaq_wire::{queue, ClockMode, SampleFormat};
use vhost_device_daq::backend::{DaqBackend, DeviceOptions, TIMER_EVENT};
use vhost_device_daq::model::{Limits, Settings};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// Queue size of every ring.
pub const QUEUE_SIZE: u16 = 16;
const MEM_SIZE: u64 = 0x10_0000;
const QUEUE_BASES: [u64; 3] = [0x0, 0x2000, 0x4000];
/// Buffers and requests live from here on; descriptors may point anywhere, also outside.
const HEAP: u64 = 0x8000;

/// Reads the input front to back; missing bytes are zeros, so every input is a program.
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    /// Over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Input { bytes }
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((&b, rest)) => {
                self.bytes = rest;
                b
            }
            None => 0,
        }
    }

    /// The next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// The next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// Up to `n` next bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.bytes.len());
        let (taken, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        taken
    }
}

/// The device under a hostile driver.
pub struct Rig<'m> {
    mem: &'m GuestMemoryMmap<()>,
    backend: DaqBackend,
    vrings: Vec<VringRwLock>,
    queues: Vec<MockSplitQueue<'m, GuestMemoryMmap<()>>>,
    /// Heads made available per queue (what the used rings may hold at most).
    made_available: [u64; 3],
    /// The device found a ring corrupt (NEEDS_RESET) at some point: entries it could not
    /// answer stay unanswered, also after the reset that follows.
    ring_corrupted: bool,
    /// Rings stopped so far (bit per queue).
    stopped: u8,
}

/// Guest memory for one run.
pub fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("memory")
}

impl<'m> Rig<'m> {
    /// A device with settings and features from the input's first bytes.
    pub fn new(mem: &'m GuestMemoryMmap<()>, input: &mut Input<'_>) -> Self {
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let setup = input.u8();
        let format =
            [SampleFormat::S16, SampleFormat::S32, SampleFormat::F32][usize::from(setup % 3)];
        let clock = if setup & 0x4 != 0 {
            ClockMode::FreeRunning
        } else {
            ClockMode::Paced
        };
        let settings = Settings {
            rate_hz: 1_000_000,
            channels: u16::from(input.u8() % 8) + 1,
            format,
            clock,
            latency_us: 1000,
            watermark_frames: 1,
            coalesce_buffers: u16::from(setup >> 6) + 1,
            ..Settings::default()
        };
        let mut backend = DaqBackend::new(DeviceOptions {
            settings,
            limits: Limits {
                fifo_frames: 256,
                ..Limits::default()
            },
            queue_size: QUEUE_SIZE,
            tick: Duration::from_millis(1),
            scenario: None,
            deterministic: setup & 0x8 != 0,
            source: None,
            record: None,
            allow_unsealed_memory: false,
            poll: std::time::Duration::ZERO,
        })
        .expect("valid options");
        let features = u64::from(input.u8() & 0x3)
            | if setup & 0x10 != 0 {
                1 << vdaq_wire::feature::VIRTIO_F_EVENT_IDX
            } else {
                0
            };
        backend.acked_features(features);
        backend.set_event_idx(setup & 0x10 != 0);
        backend.update_memory(atomic.clone()).expect("memory");
        let mut vrings = Vec::new();
        let mut queues = Vec::new();
        for base in QUEUE_BASES {
            let mock = MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE);
            let vring = VringRwLock::new(atomic.clone(), QUEUE_SIZE).expect("vring");
            vring
                .set_queue_info(
                    mock.desc_table_addr().0,
                    mock.avail_addr().0,
                    mock.used_addr().0,
                )
                .expect("queue info");
            vring.set_queue_size(QUEUE_SIZE);
            vring.set_queue_event_idx(setup & 0x10 != 0);
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            vrings.push(vring);
            queues.push(mock);
        }
        Rig {
            mem,
            backend,
            vrings,
            queues,
            made_available: [0; 3],
            ring_corrupted: false,
            stopped: 0,
        }
    }

    /// Writes one raw descriptor at `index` of `queue`'s table.
    pub fn write_descriptor(
        &self,
        queue: usize,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let table = self.queues[queue].desc_table_addr().0;
        let at = table + u64::from(index % QUEUE_SIZE) * 16;
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = self.mem.write_slice(&raw, GuestAddress(at));
    }

    /// Puts `head` on `queue`'s available ring and moves its index on by one.
    pub fn make_available(&mut self, queue: usize, head: u16) {
        let avail = self.queues[queue].avail_addr().0;
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
        let slot = avail + 4 + u64::from(idx % QUEUE_SIZE) * 2;
        let _ = self.mem.write_obj(head, GuestAddress(slot));
        let _ = self
            .mem
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2));
        self.made_available[queue] += 1;
    }

    /// Sets `queue`'s available index outright (a driver breaking the ring).
    pub fn set_avail_idx(&mut self, queue: usize, idx: u16) {
        let avail = self.queues[queue].avail_addr().0;
        let old: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
        self.made_available[queue] += u64::from(idx.wrapping_sub(old));
        let _ = self.mem.write_obj(idx, GuestAddress(avail + 2));
    }

    /// Writes `bytes` into guest memory at `addr` (as far as memory goes).
    pub fn write(&self, addr: u64, bytes: &[u8]) {
        let _ = self.mem.write_slice(bytes, GuestAddress(addr % MEM_SIZE));
    }

    /// An address for a buffer of `len` bytes chosen by `pick`: mostly in the heap, sometimes
    /// anywhere (the device must refuse what is outside memory).
    pub fn address(pick: u32) -> u64 {
        if pick & 0x8000_0000 != 0 {
            u64::from(pick) << 8
        } else {
            HEAP + u64::from(pick) % (MEM_SIZE - HEAP)
        }
    }

    /// The device handles an event: a queue kick (0–2) or its clock tick.
    pub fn kick(&mut self, event: u16) {
        let event = if event >= queue::COUNT {
            TIMER_EVENT
        } else {
            event
        };
        self.backend
            .handle_event(event, EventSet::IN, &self.vrings, 0)
            .expect("handle_event reports guest errors, never fails");
    }

    /// The frontend stops `queue`'s ring (as at reset or VM pause): the device returns what it
    /// holds there, and the ring is not served again. Once every ring stopped, the device
    /// resets and forgets what it held (the frontend would set the rings up anew), so the
    /// rings' positions are no longer compared from then on.
    pub fn stop(&mut self, queue: u16) {
        let queue = queue % queue::COUNT;
        let _ = self.backend.stop_vring(u32::from(queue));
        self.vrings[usize::from(queue)].set_queue_ready(false);
        self.stopped |= 1 << queue;
        if self.stopped == 0b111 {
            self.ring_corrupted = true;
        }
    }

    /// A configuration read of `size` bytes at `offset`: never more than the space.
    pub fn read_config(&self, offset: u32, size: u32) {
        let bytes = self.backend.get_config(offset, size);
        assert!(bytes.len() <= vdaq_wire::config::CONFIG_SIZE);
    }

    /// What the device must keep true whatever the driver did.
    pub fn check(&mut self) {
        let card = self.backend.card();
        self.ring_corrupted |= card.state() == vdaq_wire::DeviceState::NeedsReset;
        let c = card.counters();
        assert_eq!(
            c.frames_produced,
            c.frames_delivered + c.frames_dropped + card.frames_pending(),
            "every frame is delivered, dropped or pending"
        );
        for (queue, vring) in self.vrings.iter().enumerate() {
            // The device's own positions (the guest can scribble over the rings' indices):
            // it never returns more chains than it took, nor holds more than the queue size.
            let state = vring.get_ref();
            let taken = state.get_queue().next_avail();
            let returned = state.get_queue().next_used();
            let outstanding = taken.wrapping_sub(returned);
            // A corrupt ring (NEEDS_RESET) may leave entries that cannot be answered.
            assert!(
                outstanding <= QUEUE_SIZE || self.ring_corrupted,
                "queue {queue}: took {taken}, returned {returned}"
            );
        }
    }
}

/// Runs the generic operations of a queue program: chains on any queue, kicks, ticks, ring
/// damage, stops, config reads. `queue_bias` picks the queue most operations go to.
pub fn run_program(rig: &mut Rig<'_>, input: &mut Input<'_>, queue_bias: usize) {
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        let op = input.u8();
        let queue = match op >> 6 {
            0 | 1 => queue_bias,
            2 => (queue_bias + 1) % 3,
            _ => (queue_bias + 2) % 3,
        };
        match op & 0x3f {
            // A chain of 1..=4 descriptors, linked, writable or readable as the input says.
            0..=19 => {
                let head = input.u16() % QUEUE_SIZE;
                let count = u16::from(input.u8() % 4) + 1;
                for i in 0..count {
                    let addr = Rig::address(input.u32());
                    let len = u32::from(input.u16());
                    let mut flags = input.u8() as u16 & 0x6; // WRITE, INDIRECT
                    let next = (head + i + 1) % QUEUE_SIZE;
                    if i + 1 < count {
                        flags |= 0x1; // NEXT
                    }
                    rig.write_descriptor(queue, head + i, addr, len, flags, next);
                }
                rig.make_available(queue, head);
            }
            // A raw descriptor, every field the fuzzer's.
            20..=24 => {
                let index = input.u16();
                let addr = u64::from(input.u32()) | (u64::from(input.u8()) << 32);
                let len = input.u32();
                let flags = input.u16();
                let next = input.u16();
                rig.write_descriptor(queue, index, addr, len, flags, next);
            }
            25..=29 => {
                let head = input.u16();
                rig.make_available(queue, head);
            }
            30..=44 => rig.kick(queue as u16),
            45..=49 => rig.kick(TIMER_EVENT),
            50 => {
                let idx = input.u16();
                rig.set_avail_idx(queue, idx);
            }
            51..=54 => {
                let addr = u64::from(input.u32());
                let len = usize::from(input.u8());
                let bytes = input.take(len);
                rig.write(addr, bytes);
            }
            55 => rig.stop(queue as u16),
            56..=57 => {
                let offset = u32::from(input.u8());
                let size = u32::from(input.u8());
                rig.read_config(offset, size);
            }
            _ => rig.kick(queue as u16),
        }
        rig.check();
    }
    // The driver goes away: every ring stops (the device resets), and it must still hold.
    for queue in 0..queue::COUNT {
        rig.stop(queue);
    }
    rig.check();
}

impl Rig<'_> {
    /// START through a well-formed command (so that the clock runs for what follows).
    pub fn start(&mut self) {
        self.command(vdaq_wire::control::opcode::START, 0, &[], 8);
    }

    /// A well-framed command: header (`opcode`, `reserved`) and `payload` in one readable
    /// descriptor, a `reply_len`-byte writable one, made available and kicked.
    pub fn command(&mut self, opcode: u32, reserved: u32, payload: &[u8], reply_len: u32) {
        let control = usize::from(queue::CONTROL);
        let mut request = opcode.to_le_bytes().to_vec();
        request.extend_from_slice(&reserved.to_le_bytes());
        request.extend_from_slice(payload);
        let request_at = HEAP;
        let reply_at = HEAP + 0x1000;
        self.write(request_at, &request);
        let head = (self.made_available[control] % u64::from(QUEUE_SIZE / 2)) as u16 * 2;
        self.write_descriptor(
            control,
            head,
            request_at,
            request.len() as u32,
            0x1,
            head + 1,
        );
        self.write_descriptor(control, head + 1, reply_at, reply_len, 0x2, 0);
        self.make_available(control, head);
        self.kick(queue::CONTROL);
    }
}

/// A read buffer in plain memory, for driving the card model directly.
pub struct VecBuffer(Vec<u8>);

impl vhost_device_daq::model::ReadBuffer for VecBuffer {
    fn payload_capacity(&self) -> usize {
        self.0.len().saturating_sub(vdaq_wire::buffer::HEADER_SIZE)
    }

    fn write_payload(
        &mut self,
        offset: usize,
        data: &[u8],
    ) -> Result<(), vhost_device_daq::model::BufferWriteError> {
        let at = vdaq_wire::buffer::HEADER_SIZE + offset;
        match self.0.get_mut(at..at + data.len()) {
            Some(place) => {
                place.copy_from_slice(data);
                Ok(())
            }
            None => Err(vhost_device_daq::model::BufferWriteError {
                offset,
                len: data.len(),
            }),
        }
    }

    fn write_header(
        &mut self,
        header: &vdaq_wire::buffer::BufferHeader,
    ) -> Result<(), vhost_device_daq::model::BufferWriteError> {
        use vdaq_wire::zerocopy::IntoBytes;
        let bytes = header.as_bytes();
        match self.0.get_mut(..bytes.len()) {
            Some(place) => {
                place.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(vhost_device_daq::model::BufferWriteError {
                offset: 0,
                len: bytes.len(),
            }),
        }
    }
}

/// Runs a parsed scenario on a card for two virtual seconds, buffers always posted, and
/// checks the accounting throughout.
pub fn drive_scenario(scenario: vhost_device_daq::model::scenario::Scenario) {
    use vhost_device_daq::model::Card;
    let settings = Settings {
        rate_hz: 10_000,
        channels: 2,
        ..Settings::default()
    };
    let Ok(mut card) = Card::<VecBuffer>::new(settings, Limits::default()) else {
        return;
    };
    card.set_deterministic(true);
    card.set_scenario(scenario);
    card.set_trigger_enabled(true);
    let mut out = Vec::new();
    card.start(0);
    let mut now = 0;
    for _ in 0..200 {
        while card.buffers_held() < 8 {
            card.post(VecBuffer(vec![0; 64 + 512]), now, &mut out);
        }
        now += 10_000_000;
        card.advance(now, &mut out);
        out.clear();
        let c = card.counters();
        assert_eq!(
            c.frames_produced,
            c.frames_delivered + c.frames_dropped + card.frames_pending()
        );
        while card.pop_event().is_some() {}
    }
}

/// A control-socket slot with a live device in it.
pub fn device_slot() -> vhost_device_daq::control::DeviceSlot {
    let backend = DaqBackend::new(DeviceOptions {
        settings: Settings::default(),
        limits: Limits::default(),
        queue_size: QUEUE_SIZE,
        tick: Duration::from_millis(1),
        scenario: None,
        deterministic: false,
        source: None,
        record: None,
        allow_unsealed_memory: false,
        poll: std::time::Duration::ZERO,
    })
    .expect("valid options");
    std::sync::Arc::new(std::sync::Mutex::new(Some(std::sync::Arc::new(
        std::sync::RwLock::new(backend),
    ))))
}
