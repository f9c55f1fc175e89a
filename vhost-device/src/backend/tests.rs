//! Queue-level tests: the backend driven through virtio-queue's MockSplitQueue, with
//! well-formed and hostile descriptor chains.

use super::*;
use vdaq_wire::buffer::{flags, status as buffer_status};
use vdaq_wire::buffer::{BufferHeader, HEADER_SIZE, MAX_CHAIN_DESCRIPTORS};
use vdaq_wire::config::DaqConfig;
use vdaq_wire::config::CONFIG_SIZE;
use vdaq_wire::control::{self, CommandHeader, ResponseHeader};
use vdaq_wire::control::{opcode, Configure, FlushReply, Status};
use vdaq_wire::event::{kind, Event};
use vdaq_wire::feature;
use vdaq_wire::pattern::verify_counter;
use vdaq_wire::zerocopy::{FromBytes, IntoBytes};
use vdaq_wire::{ClockMode, DeviceState, SampleFormat};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackendMut;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

const QUEUE_SIZE: u16 = 16;
const MEM_SIZE: usize = 0x40_0000;
const QUEUE_BASES: [u64; 3] = [0x0, 0x4000, 0x8000];
/// Buffers are carved from here upward.
const HEAP_BASE: u64 = 0x1_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const R: u16 = 0;

fn settings(clock: ClockMode) -> Settings {
    Settings {
        rate_hz: 1_000_000,
        channels: 2,
        format: SampleFormat::S32,
        signal_freq_mhz: 1000,
        amplitude_permille: 1000,
        seed: 1,
        clock,
        latency_us: 1_000_000,
        watermark_frames: 1,
        ..Settings::default()
    }
}

/// The backend with three mock queues in one guest memory.
struct Rig<'a> {
    mem: &'a GuestMemoryMmap<()>,
    backend: DaqBackend,
    vrings: Vec<VringRwLock>,
    queues: Vec<MockSplitQueue<'a, GuestMemoryMmap<()>>>,
    next_desc: [u16; 3],
    heap: u64,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap<()>, clock: ClockMode, fifo_frames: u32) -> Self {
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mut backend = DaqBackend::new(DeviceOptions {
            settings: settings(clock),
            limits: Limits {
                fifo_frames,
                ..Limits::default()
            },
            queue_size: QUEUE_SIZE,
            tick: Duration::from_millis(1),
            scenario: None,
            deterministic: false,
            source: None,
            record: None,
            allow_unsealed_memory: false,
        })
        .expect("backend");
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
            next_desc: [0; 3],
            heap: HEAP_BASE,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.heap;
        self.heap += len.next_multiple_of(64);
        addr
    }

    /// Makes a chain of `(addr, len, flags)` descriptors available on `queue`, linked in
    /// order. Returns the head index.
    fn make_available(&mut self, queue: u16, descs: &[(u64, u32, u16)]) -> u16 {
        let q = usize::from(queue);
        let head = self.next_desc[q];
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let index = head + i as u16;
                let (flags, next) = if i + 1 < descs.len() {
                    (flags | VRING_DESC_F_NEXT as u16, (index + 1) % QUEUE_SIZE)
                } else {
                    (flags, 0)
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.queues[q].add_desc_chains(&raw, head).expect("chain");
        self.next_desc[q] = (head + descs.len() as u16) % QUEUE_SIZE;
        head
    }

    fn kick(&mut self, queue: u16) {
        self.backend
            .handle_event(queue, EventSet::IN, &self.vrings, 0)
            .expect("handle_event never fails");
    }

    fn used(&self, queue: u16) -> Vec<(u16, u32)> {
        let used = self.queues[usize::from(queue)].used();
        let count = used.idx().load();
        (0..count)
            .map(|i| {
                let elem = used
                    .ring()
                    .ref_at(usize::from(i % QUEUE_SIZE))
                    .expect("used elem")
                    .load();
                (elem.id() as u16, elem.len())
            })
            .collect()
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        self.mem
            .read_slice(&mut bytes, GuestAddress(addr))
            .expect("read");
        bytes
    }

    /// Sends a command; returns (status, reply payload).
    fn command(&mut self, op: u32, payload: &[u8], reply_len: usize) -> (u32, Vec<u8>) {
        let mut request = CommandHeader {
            opcode: op.into(),
            reserved: 0.into(),
        }
        .as_bytes()
        .to_vec();
        request.extend_from_slice(payload);
        let req_addr = self.alloc(request.len() as u64);
        self.mem
            .write_slice(&request, GuestAddress(req_addr))
            .expect("write request");
        let resp_addr = self.alloc(reply_len as u64);
        let before = self.used(queue::CONTROL).len();
        self.make_available(
            queue::CONTROL,
            &[
                (req_addr, request.len() as u32, R),
                (resp_addr, reply_len as u32, W),
            ],
        );
        self.kick(queue::CONTROL);
        let used = self.used(queue::CONTROL);
        assert_eq!(used.len(), before + 1, "one reply per command");
        let used_len = used[before].1 as usize;
        assert!(used_len >= 8, "reply has a header");
        let reply = self.read(resp_addr, used_len);
        let header = ResponseHeader::read_from_bytes(&reply[..8]).expect("header");
        (header.status.get(), reply[8..].to_vec())
    }

    /// Posts a data buffer of `frames` frames (2 × S32) as one descriptor.
    fn post_read(&mut self, frames: usize) -> (u16, u64) {
        let len = HEADER_SIZE + frames * 8;
        let addr = self.alloc(len as u64);
        let head = self.make_available(queue::DATA, &[(addr, len as u32, W)]);
        (head, addr)
    }

    fn header_at(&self, addr: u64) -> BufferHeader {
        BufferHeader::read_from_bytes(&self.read(addr, HEADER_SIZE)).expect("header")
    }

    fn assert_counter_payload(&self, addr: u64) -> BufferHeader {
        let header = self.header_at(addr);
        let payload = self.read(
            addr + HEADER_SIZE as u64,
            header.payload_bytes().expect("format"),
        );
        assert_eq!(
            verify_counter(SampleFormat::S32, header.first_frame.get() * 2, &payload),
            None
        );
        header
    }
}

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory")
}

#[test]
fn free_running_stream_fills_posted_buffers_in_order() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
    let posted: Vec<_> = (0..4).map(|_| rig.post_read(100)).collect();
    rig.kick(queue::DATA);
    assert!(rig.used(queue::DATA).is_empty(), "nothing before START");
    assert_eq!(rig.command(opcode::START, &[], 8).0, control::status::OK);
    let used = rig.used(queue::DATA);
    assert_eq!(used.len(), 4);
    for (i, ((head, addr), (used_head, used_len))) in posted.iter().zip(&used).enumerate() {
        assert_eq!(head, used_head);
        assert_eq!(*used_len as usize, HEADER_SIZE + 800);
        let header = rig.assert_counter_payload(*addr);
        assert_eq!(header.sequence.get(), i as u64);
        assert_eq!(header.first_frame.get(), 100 * i as u64);
    }
}

#[test]
fn buffer_split_over_several_descriptors_is_filled_across_them() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
    rig.command(opcode::START, &[], 8);
    // Header split across two descriptors, payload across two more, odd sizes.
    let parts = [40u64, 30, 333, 400];
    let addrs: Vec<u64> = parts.iter().map(|&len| rig.alloc(len)).collect();
    let descs: Vec<_> = parts
        .iter()
        .zip(&addrs)
        .map(|(&len, &addr)| (addr, len as u32, W))
        .collect();
    rig.make_available(queue::DATA, &descs);
    rig.kick(queue::DATA);
    let used = rig.used(queue::DATA);
    // 803 bytes: 64 header + 739 payload → 92 whole frames.
    assert_eq!(used, vec![(0, (HEADER_SIZE + 92 * 8) as u32)]);
    let mut bytes = Vec::new();
    for (&len, &addr) in parts.iter().zip(&addrs) {
        bytes.extend(rig.read(addr, len as usize));
    }
    let header = BufferHeader::read_from_bytes(&bytes[..HEADER_SIZE]).expect("header");
    assert_eq!(header.frame_count.get(), 92);
    assert_eq!(
        verify_counter(
            SampleFormat::S32,
            0,
            &bytes[HEADER_SIZE..HEADER_SIZE + 92 * 8]
        ),
        None
    );
}

#[test]
fn malformed_read_buffers_get_used_length_zero_and_the_queue_keeps_working() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
    rig.command(opcode::START, &[], 8);
    let sentinel = rig.alloc(4096);
    let cases: Vec<Vec<(u64, u32, u16)>> = vec![
        // Device-readable descriptor in a read buffer.
        vec![(sentinel, 4096, R)],
        // Readable after writable.
        vec![(sentinel, 2048, W), (sentinel + 2048, 2048, R)],
        // Too short for the header.
        vec![(sentinel, 63, W)],
        // Outside guest memory.
        vec![(MEM_SIZE as u64 - 16, 4096, W)],
        // Address wraps around the address space.
        vec![(u64::MAX - 8, 4096, W)],
    ];
    for (i, chain) in cases.iter().enumerate() {
        rig.mem
            .write_slice(&[0x5a; 4096], GuestAddress(sentinel))
            .expect("fill");
        let head = rig.make_available(queue::DATA, chain);
        rig.kick(queue::DATA);
        let used = rig.used(queue::DATA);
        assert_eq!(used.last(), Some(&(head, 0)), "case {i} rejected");
        assert_eq!(
            rig.read(sentinel, 4096),
            vec![0x5a; 4096],
            "case {i}: nothing written"
        );
    }
    let (head, addr) = rig.post_read(10);
    rig.kick(queue::DATA);
    assert_eq!(
        rig.used(queue::DATA).last(),
        Some(&(head, (HEADER_SIZE + 80) as u32))
    );
    let header = rig.assert_counter_payload(addr);
    assert_eq!(
        header.first_frame.get(),
        0,
        "rejected buffers consumed no frames"
    );
    let config =
        DaqConfig::read_from_bytes(&rig.backend.get_config(0, CONFIG_SIZE as u32)).expect("config");
    assert_eq!(config.requests_rejected.get(), cases.len() as u64);
}

#[test]
fn looping_and_oversized_chains_are_rejected() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
    rig.command(opcode::START, &[], 8);
    let buf = rig.alloc(4096);
    // Descriptor 0 → 1 → 0 → ...: a loop.
    let looping = [
        RawDescriptor::from(SplitDescriptor::new(
            buf,
            64,
            W | VRING_DESC_F_NEXT as u16,
            1,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            buf + 64,
            64,
            W | VRING_DESC_F_NEXT as u16,
            0,
        )),
    ];
    rig.queues[0].add_desc_chains(&looping, 0).expect("chain");
    rig.next_desc[0] = 2;
    rig.kick(queue::DATA);
    assert_eq!(rig.used(queue::DATA), vec![(0, 0)]);

    // An indirect table of MAX_CHAIN_DESCRIPTORS + 1 descriptors of 64 bytes each.
    let count = MAX_CHAIN_DESCRIPTORS + 1;
    let table = rig.alloc(16 * count as u64);
    let data = rig.alloc(64 * count as u64);
    for i in 0..count {
        let flags = if i + 1 < count {
            W | VRING_DESC_F_NEXT as u16
        } else {
            W
        };
        let desc = RawDescriptor::from(SplitDescriptor::new(
            data + 64 * i as u64,
            64,
            flags,
            (i + 1) as u16,
        ));
        rig.mem
            .write_obj(desc, GuestAddress(table + 16 * i as u64))
            .expect("table");
    }
    let head = rig.make_available(
        queue::DATA,
        &[(table, 16 * count as u32, VRING_DESC_F_INDIRECT as u16)],
    );
    rig.kick(queue::DATA);
    assert_eq!(rig.used(queue::DATA).last(), Some(&(head, 0)));

    // The same table with one descriptor fewer is accepted.
    let last = count - 2;
    let desc = RawDescriptor::from(SplitDescriptor::new(data + 64 * last as u64, 64, W, 0));
    rig.mem
        .write_obj(desc, GuestAddress(table + 16 * last as u64))
        .expect("table");
    let head = rig.make_available(
        queue::DATA,
        &[(table, 16 * (count - 1) as u32, VRING_DESC_F_INDIRECT as u16)],
    );
    rig.kick(queue::DATA);
    let frames = ((count - 1) * 64 - HEADER_SIZE) / 8;
    assert_eq!(
        rig.used(queue::DATA).last(),
        Some(&(head, (HEADER_SIZE + frames * 8) as u32))
    );
}

#[test]
fn a_buffer_with_room_for_the_header_only_gets_bad_buffer_status() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
    let addr = rig.alloc(HEADER_SIZE as u64 + 7);
    let head = rig.make_available(queue::DATA, &[(addr, HEADER_SIZE as u32 + 7, W)]);
    rig.kick(queue::DATA);
    assert_eq!(rig.used(queue::DATA), vec![(head, HEADER_SIZE as u32)]);
    assert_eq!(rig.header_at(addr).status, buffer_status::BAD_BUFFER);
}

#[test]
fn control_commands_answer_every_malformed_request() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    assert_eq!(rig.command(77, &[], 8).0, control::status::UNSUPPORTED);
    assert_eq!(
        rig.command(opcode::START, &[1, 2], 8).0,
        control::status::BAD_SIZE
    );
    assert_eq!(
        rig.command(opcode::GET_STATUS, &[], 16).0,
        control::status::BAD_SIZE,
        "reply area too small for STATUS"
    );
    // A request shorter than the command header.
    let req = rig.alloc(4);
    let resp = rig.alloc(8);
    rig.make_available(queue::CONTROL, &[(req, 4, R), (resp, 8, W)]);
    rig.kick(queue::CONTROL);
    let used = rig.used(queue::CONTROL);
    assert_eq!(used.last().map(|u| u.1), Some(8));
    assert_eq!(rig.read(resp, 4), control::status::BAD_SIZE.to_le_bytes());
    // No room for any reply: used length 0, nothing written.
    rig.mem
        .write_slice(&[0x77; 4], GuestAddress(resp))
        .expect("fill");
    let head = rig.make_available(queue::CONTROL, &[(req, 8, R), (resp, 4, W)]);
    rig.kick(queue::CONTROL);
    assert_eq!(rig.used(queue::CONTROL).last(), Some(&(head, 0)));
    assert_eq!(rig.read(resp, 4), vec![0x77; 4]);
    // Readable after writable.
    let head = rig.make_available(queue::CONTROL, &[(resp, 8, W), (req, 8, R)]);
    rig.kick(queue::CONTROL);
    assert_eq!(rig.used(queue::CONTROL).last(), Some(&(head, 0)));
    // And a good command still works.
    let (status, payload) = rig.command(opcode::GET_STATUS, &[], 8 + 72);
    assert_eq!(status, control::status::OK);
    let status = Status::read_from_bytes(&payload).expect("status");
    assert_eq!(status.state, DeviceState::Stopped as u8);
    assert!(status.requests_rejected.get() >= 5);
}

#[test]
fn configure_changes_the_stream_and_the_config_space() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
    let configure = Configure {
        channels: 3.into(),
        format: SampleFormat::S16 as u8,
        ..settings(ClockMode::FreeRunning).to_wire()
    };
    assert_eq!(
        rig.command(opcode::CONFIGURE, configure.as_bytes(), 8).0,
        control::status::OK
    );
    let config =
        DaqConfig::read_from_bytes(&rig.backend.get_config(0, CONFIG_SIZE as u32)).expect("config");
    assert_eq!(config.channels.get(), 3);
    assert_eq!(config.format, SampleFormat::S16 as u8);
    rig.command(opcode::START, &[], 8);
    let addr = rig.alloc(HEADER_SIZE as u64 + 60);
    rig.make_available(queue::DATA, &[(addr, HEADER_SIZE as u32 + 60, W)]);
    rig.kick(queue::DATA);
    let header = rig.header_at(addr);
    assert_eq!(header.channels.get(), 3);
    assert_eq!(header.frame_count.get(), 10);
    assert_ne!(header.flags.get() & flags::DISCONTINUITY, 0);
    let payload = rig.read(addr + HEADER_SIZE as u64, 60);
    assert_eq!(verify_counter(SampleFormat::S16, 0, &payload), None);
}

#[test]
fn flush_returns_every_held_buffer_before_its_reply() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1 << 20);
    let posted: Vec<_> = (0..5).map(|_| rig.post_read(1 << 16)).collect();
    rig.kick(queue::DATA);
    rig.command(opcode::START, &[], 8);
    let (status, payload) = rig.command(opcode::FLUSH, &[], 16);
    assert_eq!(status, control::status::OK);
    let reply = FlushReply::read_from_bytes(&payload).expect("flush reply");
    assert_eq!(reply.buffers_returned.get(), 5);
    let used = rig.used(queue::DATA);
    assert_eq!(used.len(), 5);
    for (head, addr) in &posted {
        assert!(used.iter().any(|(h, _)| h == head));
        let header = rig.assert_counter_payload(*addr);
        assert_ne!(header.flags.get() & flags::FLUSHED, 0);
    }
    let (_, payload) = rig.command(opcode::GET_STATUS, &[], 80);
    let status = Status::read_from_bytes(&payload).expect("status");
    assert_eq!(status.buffers_held.get(), 0);
}

#[test]
fn overrun_is_reported_through_the_event_queue() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 64);
    let event_addr = rig.alloc(32);
    rig.make_available(queue::EVENT, &[(event_addr, 32, W)]);
    rig.kick(queue::EVENT);
    rig.command(opcode::START, &[], 8);
    // 1 MHz into a 64-frame FIFO with no read buffer: overrun within microseconds.
    std::thread::sleep(Duration::from_millis(5));
    rig.command(opcode::STOP, &[], 8);
    assert_eq!(rig.used(queue::EVENT), vec![(0, 32)]);
    let event = Event::read_from_bytes(&rig.read(event_addr, 32)).expect("event");
    assert_eq!(event.kind.get(), kind::OVERRUN);
    assert!(
        event.arg0.get() > 1000,
        "dropped frames counted: {}",
        event.arg0.get()
    );
    assert_eq!(
        event.arg1.get(),
        64,
        "first dropped frame follows the full FIFO"
    );
    let (_, payload) = rig.command(opcode::GET_STATUS, &[], 80);
    let status = Status::read_from_bytes(&payload).expect("status");
    assert_eq!(status.frames_dropped.get(), event.arg0.get());
    assert_eq!(
        status.frames_produced.get(),
        status.frames_delivered.get() + status.frames_dropped.get() + status.frames_pending.get()
    );
}

#[test]
fn short_event_buffers_are_rejected() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 64);
    let addr = rig.alloc(16);
    let head = rig.make_available(queue::EVENT, &[(addr, 16, W)]);
    rig.kick(queue::EVENT);
    assert_eq!(rig.used(queue::EVENT), vec![(head, 0)]);
}

#[test]
fn a_corrupt_avail_index_puts_the_device_in_needs_reset() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
    rig.queues[0].avail().idx().store(QUEUE_SIZE + 5);
    rig.kick(queue::DATA);
    let config =
        DaqConfig::read_from_bytes(&rig.backend.get_config(0, CONFIG_SIZE as u32)).expect("config");
    assert_eq!(config.state, DeviceState::NeedsReset as u8);
    assert_eq!(
        config.fault_code.get(),
        vdaq_wire::event::fault::QUEUE_CORRUPT
    );
    assert_eq!(rig.command(opcode::START, &[], 8).0, control::status::BUSY);
    rig.backend.reset_device();
    assert_eq!(rig.backend.card().state(), DeviceState::Stopped);
}

#[test]
fn stopping_the_data_queue_returns_held_buffers() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    for _ in 0..3 {
        rig.post_read(1000);
    }
    rig.kick(queue::DATA);
    assert_eq!(rig.backend.card().buffers_held(), 3);
    rig.backend
        .stop_vring(u32::from(queue::DATA))
        .expect("stop");
    assert_eq!(rig.used(queue::DATA).len(), 3);
    assert_eq!(rig.backend.card().buffers_held(), 0);
}

#[test]
fn config_reads_are_bounded_to_the_config_space() {
    let mem = memory();
    let rig = Rig::new(&mem, ClockMode::Paced, 1024);
    assert_eq!(
        rig.backend.get_config(0, CONFIG_SIZE as u32).len(),
        CONFIG_SIZE
    );
    assert_eq!(rig.backend.get_config(104, 8), b"vdaq-sim".to_vec());
    assert_eq!(
        rig.backend.get_config(128, 4),
        10_000_000u32.to_le_bytes().to_vec()
    );
    assert!(rig.backend.get_config(128, 16).is_empty());
    assert!(rig.backend.get_config(u32::MAX, 2).is_empty());
}

/// spec: [4-5] the configuration space states the device's tick.
#[test]
fn config_space_states_the_tick() {
    let mem = memory();
    let rig = Rig::new(&mem, ClockMode::Paced, 1024);
    assert_eq!(
        rig.backend.get_config(132, 4),
        1000u32.to_le_bytes().to_vec()
    );
}

#[test]
fn advertised_features_match_the_wire_crate() {
    let mem = memory();
    let rig = Rig::new(&mem, ClockMode::Paced, 1024);
    let features = rig.backend.features();
    assert_eq!(
        features & feature::DEVICE_FEATURES,
        feature::DEVICE_FEATURES
    );
    assert!(rig
        .backend
        .protocol_features()
        .contains(VhostUserProtocolFeatures::CONFIG));
}

#[test]
fn a_buffer_made_available_twice_while_held_puts_the_device_in_needs_reset() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    let addr = rig.alloc(4096);
    // Two avail entries naming the same descriptor chain (head 0).
    rig.make_available(queue::DATA, &[(addr, 4096, W)]);
    rig.next_desc[0] = 0;
    rig.make_available(queue::DATA, &[(addr, 4096, W)]);
    rig.kick(queue::DATA);
    assert_eq!(rig.backend.card().buffers_held(), 1, "held once, not twice");
    assert_eq!(rig.backend.card().state(), DeviceState::NeedsReset);
}
