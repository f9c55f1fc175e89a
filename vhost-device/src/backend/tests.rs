//! Queue-level tests: the backend driven through virtio-queue's MockSplitQueue, with
//! well-formed and hostile descriptor chains.

use super::*;
use std::os::fd::{FromRawFd, IntoRawFd};
use vdaq_wire::buffer::{flags, status as buffer_status};
use vdaq_wire::buffer::{BufferHeader, HEADER_SIZE, MAX_CHAIN_DESCRIPTORS};
use vdaq_wire::config::DaqConfig;
use vdaq_wire::config::CONFIG_SIZE;
use vdaq_wire::control::{self, CommandHeader, ResponseHeader};
use vdaq_wire::control::{opcode, Configure, FlushReply, Status};
use vdaq_wire::control::{trigger_mode, TriggerConfig};
use vdaq_wire::event::{kind, Event, EVENT_SIZE};
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
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

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
        Self::polling(mem, clock, fifo_frames, Duration::ZERO)
    }

    /// A rig whose device polls the data queue for `poll` ([`DeviceOptions::poll`]).
    fn polling(
        mem: &'a GuestMemoryMmap<()>,
        clock: ClockMode,
        fifo_frames: u32,
        poll: Duration,
    ) -> Self {
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
            poll,
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
        let before = self.used(queue::CONTROL).len();
        let (_, resp_addr) = self.queue_command(op, 0, payload, reply_len);
        self.kick(queue::CONTROL);
        let used = self.used(queue::CONTROL);
        assert_eq!(used.len(), before + 1, "one reply per command");
        self.reply(resp_addr, used[before].1)
    }

    /// Writes a request (header with `reserved`, then `payload`) into guest memory; returns
    /// its address and length.
    fn request(&mut self, op: u32, reserved: u32, payload: &[u8]) -> (u64, u32) {
        let mut request = CommandHeader {
            opcode: op.into(),
            reserved: reserved.into(),
        }
        .as_bytes()
        .to_vec();
        request.extend_from_slice(payload);
        let addr = self.alloc(request.len() as u64);
        self.mem
            .write_slice(&request, GuestAddress(addr))
            .expect("write request");
        (addr, request.len() as u32)
    }

    /// Makes a command available on controlq without kicking; returns its head and the
    /// address of its reply area.
    fn queue_command(
        &mut self,
        op: u32,
        reserved: u32,
        payload: &[u8],
        reply_len: usize,
    ) -> (u16, u64) {
        let (req_addr, req_len) = self.request(op, reserved, payload);
        let resp_addr = self.alloc(reply_len as u64);
        let head = self.make_available(
            queue::CONTROL,
            &[(req_addr, req_len, R), (resp_addr, reply_len as u32, W)],
        );
        (head, resp_addr)
    }

    /// The reply of `used_len` bytes at `resp_addr`: (status, reply payload).
    fn reply(&self, resp_addr: u64, used_len: u32) -> (u32, Vec<u8>) {
        let used_len = used_len as usize;
        assert!(used_len >= 8, "reply has a header");
        let reply = self.read(resp_addr, used_len);
        let header = ResponseHeader::read_from_bytes(&reply[..8]).expect("header");
        (header.status.get(), reply[8..].to_vec())
    }

    /// Makes the chain `descs(head)` returns available on `queue` as it is (flags and `next`
    /// fields untouched, so it may be broken); returns the head index.
    fn make_available_raw(
        &mut self,
        queue: u16,
        descs: impl FnOnce(u16) -> Vec<RawDescriptor>,
    ) -> u16 {
        let q = usize::from(queue);
        let head = self.next_desc[q];
        let descs = descs(head);
        for (i, desc) in descs.iter().enumerate() {
            let index = (head + i as u16) % QUEUE_SIZE;
            self.queues[q]
                .desc_table()
                .store(index, *desc)
                .expect("descriptor");
        }
        let avail = self.queues[q].avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % QUEUE_SIZE))
            .expect("avail entry")
            .store(head);
        avail.idx().store(idx.wrapping_add(1));
        self.next_desc[q] = (head + descs.len() as u16) % QUEUE_SIZE;
        head
    }

    fn config(&self) -> DaqConfig {
        DaqConfig::read_from_bytes(&self.backend.get_config(0, CONFIG_SIZE as u32)).expect("config")
    }

    /// Counts the used-buffer notifications of `queue` from now on (its call eventfd).
    fn watch_notifications(&self, queue: u16) -> EventFd {
        let calls = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let fd = calls.try_clone().expect("eventfd clone").into_raw_fd();
        // SAFETY: `into_raw_fd` handed over a valid eventfd that nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        self.vrings[usize::from(queue)].set_call(Some(file));
        calls
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

/// Two read buffers on the data queue, only the first of them made available yet: the
/// avail index is set back to 1 (the second is published by `publish_second`).
fn two_reads_one_published(rig: &mut Rig<'_>) -> (u16, u16, GuestAddress) {
    let (first, _) = rig.post_read(16);
    let (second, _) = rig.post_read(16);
    let avail_idx = rig.queues[usize::from(queue::DATA)]
        .avail_addr()
        .unchecked_add(2);
    rig.mem.write_obj(1u16, avail_idx).expect("avail idx");
    (first, second, avail_idx)
}

/// A running device that polls finds a buffer the driver made available after the device
/// emptied the ring, without being notified of it; then it asks for notifications again.
#[test]
fn a_polling_device_takes_a_buffer_made_available_while_it_watches_the_ring() {
    let mem = memory();
    let mut rig = Rig::polling(
        &mem,
        ClockMode::FreeRunning,
        1024,
        Duration::from_millis(500),
    );
    rig.backend
        .acked_features(1 << feature::VIRTIO_F_VERSION_1 | 1 << feature::VIRTIO_F_EVENT_IDX);
    rig.backend.set_event_idx(true);
    rig.vrings[usize::from(queue::DATA)].set_queue_event_idx(true);
    rig.command(opcode::START, &[], 8);
    let (first, second, avail_idx) = two_reads_one_published(&mut rig);
    std::thread::scope(|scope| {
        let memory = &mem;
        scope.spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            memory.write_obj(2u16, avail_idx).expect("avail idx");
        });
        rig.kick(queue::DATA);
    });
    let heads: Vec<u16> = rig.used(queue::DATA).iter().map(|&(h, _)| h).collect();
    assert_eq!(heads, [first, second], "both taken on the one notification");
    // Polling over, the device asks to be notified from the next buffer on (avail_event,
    // after the used ring's 16 entries).
    let used = rig.queues[usize::from(queue::DATA)].used_addr();
    let avail_event: u16 = mem
        .read_obj(used.unchecked_add(4 + 8 * u64::from(QUEUE_SIZE)))
        .expect("avail_event");
    assert_eq!(avail_event, 2);
}

/// Without polling (the default), or with the card stopped, a buffer made available later
/// waits for its notification.
#[test]
fn a_device_that_does_not_poll_waits_for_the_notification() {
    for (poll, start) in [(Duration::ZERO, true), (Duration::from_millis(100), false)] {
        let mem = memory();
        let mut rig = Rig::polling(&mem, ClockMode::FreeRunning, 1024, poll);
        if start {
            rig.command(opcode::START, &[], 8);
        }
        let (_, _, avail_idx) = two_reads_one_published(&mut rig);
        std::thread::scope(|scope| {
            let memory = &mem;
            scope.spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                memory.write_obj(2u16, avail_idx).expect("avail idx");
            });
            rig.kick(queue::DATA);
        });
        let used = rig.used(queue::DATA).len();
        assert_eq!(used, usize::from(start), "poll {poll:?}, started {start}");
        rig.kick(queue::DATA);
        if !start {
            rig.command(opcode::START, &[], 8);
        }
        assert_eq!(rig.used(queue::DATA).len(), 2, "the notification brings it");
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

/// spec: [7-1] [7-2] dataq rows: readable descriptors, readable after writable, under 64 bytes,
/// outside guest memory: used length 0, counted, nothing written; the stream is untouched.
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

/// spec: [7-1] a read buffer with room for the header only: BAD_BUFFER, used length 64.
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

/// spec: [7-1] [7-2] malformed control requests get their answers, nothing is written where the
/// answer is used length 0, and a good command still works afterwards.
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

/// spec: [6.13-3] when the transport stops dataq, every held buffer is completed as by FLUSH
/// (the frames sampled so far in them, the rest FLUSHED) by the time stop_vring returns.
#[test]
fn stopping_the_data_queue_returns_held_buffers() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1 << 20);
    let posted: Vec<_> = (0..3).map(|_| rig.post_read(1 << 16)).collect();
    rig.kick(queue::DATA);
    rig.command(opcode::START, &[], 8);
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(rig.backend.card().buffers_held(), 3);
    rig.backend
        .stop_vring(u32::from(queue::DATA))
        .expect("stop");
    let used = rig.used(queue::DATA);
    assert_eq!(used.len(), 3);
    assert_eq!(rig.backend.card().buffers_held(), 0);
    let mut frames = 0;
    for ((head, addr), (used_head, used_len)) in posted.iter().zip(&used) {
        assert_eq!(head, used_head);
        let header = rig.assert_counter_payload(*addr);
        let full = header.frame_count.get() == 1 << 16;
        assert!(
            full || header.flags.get() & flags::FLUSHED != 0,
            "{header:?}"
        );
        assert_eq!(
            *used_len as usize,
            HEADER_SIZE + header.frame_count.get() as usize * 8
        );
        frames += u64::from(header.frame_count.get());
    }
    assert!(frames >= 2000, "2 ms at 1 MHz: {frames} frames");
    assert_eq!(rig.config().frames_delivered.get(), frames);
}

/// spec: [4-2] [7-1] a configuration read reaching past byte 136 is refused (empty reply).
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
    assert!(rig.backend.get_config(0, CONFIG_SIZE as u32 + 1).is_empty());
    assert!(rig.backend.get_config(CONFIG_SIZE as u32, 1).is_empty());
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

/// spec: [7-1] a read buffer made available again while held: NEEDS_RESET, QUEUE_CORRUPT, not
/// counted.
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
    let config = rig.config();
    assert_eq!(
        config.fault_code.get(),
        vdaq_wire::event::fault::QUEUE_CORRUPT
    );
    assert_eq!(config.requests_rejected.get(), 0, "not counted");
}

/// A descriptor of a hand-made (possibly broken) chain.
fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// A chain as `(addr, len, flags)` descriptors, for [`Rig::make_available`].
type Chain = Vec<(u64, u32, u16)>;

/// Builds a hand-made chain given its head index.
type RawChain = Box<dyn Fn(u16) -> Vec<RawDescriptor>>;

/// A control request of the malformed-request table: case, opcode, payload, reply area,
/// expected status, counted.
type ControlRow<'a> = (&'a str, u32, &'a [u8], usize, u32, bool);

/// spec: [3-1] the device offers VIRTIO_F_VERSION_1.
#[test]
fn the_device_offers_version_1() {
    let mem = memory();
    let rig = Rig::new(&mem, ClockMode::Paced, 1024);
    assert_ne!(
        rig.backend.features() & (1 << feature::VIRTIO_F_VERSION_1),
        0
    );
}

/// (header, payload) of every OK buffer of a short free-running stream (two full buffers,
/// then an empty one from FLUSH), with `features` negotiated.
fn stream_with_features(features: u64) -> Vec<(BufferHeader, Vec<u8>)> {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
    rig.backend.acked_features(features);
    rig.command(opcode::START, &[], 8);
    let mut posted = vec![rig.post_read(10), rig.post_read(25)];
    rig.kick(queue::DATA);
    rig.command(opcode::STOP, &[], 8);
    posted.push(rig.post_read(10));
    rig.kick(queue::DATA);
    rig.command(opcode::FLUSH, &[], 16);
    assert_eq!(rig.used(queue::DATA).len(), 3);
    posted
        .iter()
        .map(|&(_, addr)| {
            let header = rig.header_at(addr);
            assert_eq!(header.status, buffer_status::OK);
            let payload = rig.read(
                addr + HEADER_SIZE as u64,
                header.payload_bytes().expect("format"),
            );
            (header, payload)
        })
        .collect()
}

/// spec: [3-2] CRC_VALID and `crc32` in every OK header (empty ones too) when VIRTIO_DAQ_F_CRC32
/// was negotiated, and neither when it was not.
#[test]
fn crc_is_filled_exactly_when_the_crc_feature_is_negotiated() {
    let version_1 = 1 << feature::VIRTIO_F_VERSION_1;
    for (header, payload) in stream_with_features(version_1 | 1 << feature::DAQ_F_CRC32) {
        assert_ne!(header.flags.get() & flags::CRC_VALID, 0, "{header:?}");
        assert_eq!(header.crc32.get(), vdaq_wire::payload_crc32(&payload));
    }
    for (header, _) in stream_with_features(version_1) {
        assert_eq!(header.flags.get() & flags::CRC_VALID, 0, "{header:?}");
        assert_eq!(header.crc32.get(), 0);
    }
}

/// spec: [3-3] TRIGGER and SET_TRIGGER are UNSUPPORTED unless VIRTIO_DAQ_F_TRIGGER was
/// negotiated (and accepted when it was).
#[test]
fn trigger_commands_are_unsupported_without_the_trigger_feature() {
    let rising = TriggerConfig {
        mode: trigger_mode::RISING,
        post_frames: 1.into(),
        ..Default::default()
    };
    let version_1 = 1 << feature::VIRTIO_F_VERSION_1;
    for (features, expected) in [
        (
            version_1 | 1 << feature::DAQ_F_CRC32,
            control::status::UNSUPPORTED,
        ),
        (version_1 | 1 << feature::DAQ_F_TRIGGER, control::status::OK),
    ] {
        let mem = memory();
        let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
        rig.backend.acked_features(features);
        assert_eq!(rig.command(opcode::TRIGGER, &[], 8).0, expected);
        assert_eq!(
            rig.command(opcode::SET_TRIGGER, rising.as_bytes(), 8).0,
            expected
        );
    }
}

/// spec: [4-1] [7-1] writes to the configuration space change nothing (and are not counted).
#[test]
fn configuration_space_writes_are_ignored() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
    let before = rig.backend.get_config(0, CONFIG_SIZE as u32);
    let writes: [(u32, &[u8]); 4] = [
        (0, &[0xff; CONFIG_SIZE]),
        (2, &3u16.to_le_bytes()),
        (43, &[DeviceState::Running as u8]),
        (88, &[1; 8]),
    ];
    for (offset, bytes) in writes {
        assert!(rig.backend.set_config(offset, bytes).is_ok());
    }
    assert_eq!(rig.backend.get_config(0, CONFIG_SIZE as u32), before);
    assert_eq!(rig.backend.card().state(), DeviceState::Stopped);
    rig.command(opcode::START, &[], 8);
    let (_, addr) = rig.post_read(10);
    rig.kick(queue::DATA);
    assert_eq!(rig.header_at(addr).channels.get(), 2, "still 2 channels");
}

/// spec: [6.2-1] accepted buffers complete in the order they were made available, whatever
/// ends them; only refused ones come back at once.
#[test]
fn accepted_buffers_complete_in_the_order_they_were_made_available() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
    let a = rig.post_read(10).0;
    let b = rig.post_read(20).0;
    let small = rig.alloc(HEADER_SIZE as u64 + 3);
    let bad_buffer = rig.make_available(queue::DATA, &[(small, HEADER_SIZE as u32 + 3, W)]);
    let c = rig.post_read(5).0;
    let readable = rig.make_available(queue::DATA, &[(small, 64, R)]);
    let d = rig.post_read(10).0;
    rig.kick(queue::DATA);
    rig.command(opcode::START, &[], 8);
    let heads: Vec<u16> = rig.used(queue::DATA).iter().map(|u| u.0).collect();
    assert_eq!(heads, [bad_buffer, readable, a, b, c, d]);

    // Paced: full ones, then whatever FLUSH ends, still in order.
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1 << 20);
    let posted: Vec<u16> = [1000, 1 << 16, 10, 1 << 16, 3]
        .iter()
        .map(|&frames| rig.post_read(frames).0)
        .collect();
    rig.kick(queue::DATA);
    rig.command(opcode::START, &[], 8);
    std::thread::sleep(Duration::from_millis(3));
    rig.kick(queue::DATA);
    rig.command(opcode::FLUSH, &[], 16);
    let heads: Vec<u16> = rig.used(queue::DATA).iter().map(|u| u.0).collect();
    assert_eq!(heads, posted);
}

/// spec: [6.6-1] the data buffers STOP, FLUSH or CONFIGURE completes are on dataq's used ring,
/// and notified, when the command's reply is written, before that reply goes on controlq's
/// used ring (`execute_command` writes the reply; its caller then puts it on the ring).
#[test]
fn buffers_a_command_completes_are_returned_and_notified_before_its_reply() {
    let wider = Configure {
        channels: 3.into(),
        coalesce_buffers: 16.into(),
        ..settings(ClockMode::Paced).to_wire()
    };
    let commands: [(u32, &[u8], usize); 3] = [
        (opcode::STOP, &[], 8),
        (opcode::FLUSH, &[], 16),
        (opcode::CONFIGURE, wider.as_bytes(), 8),
    ];
    for (op, payload, reply_len) in commands {
        let mem = memory();
        let mut rig = Rig::new(&mem, ClockMode::Paced, 1 << 20);
        // No notification but the command's: coalesce more completions than it makes.
        let coalesce = Configure {
            coalesce_buffers: 16.into(),
            ..settings(ClockMode::Paced).to_wire()
        };
        rig.command(opcode::CONFIGURE, coalesce.as_bytes(), 8);
        rig.post_read(1 << 16);
        rig.post_read(1 << 16);
        rig.kick(queue::DATA);
        if op == opcode::STOP {
            rig.command(opcode::START, &[], 8);
            std::thread::sleep(Duration::from_millis(1));
        }
        let data_calls = rig.watch_notifications(queue::DATA);
        let (_, resp_addr) = rig.queue_command(op, 0, payload, reply_len);
        let handle = rig.backend.memory().expect("memory");
        let guard = handle.memory();
        let chain = rig.vrings[usize::from(queue::CONTROL)]
            .get_mut()
            .get_queue_mut()
            .iter(handle.memory())
            .expect("ring")
            .next()
            .expect("the request");
        let used_len = rig
            .backend
            .execute_command(chain, &guard, &rig.vrings)
            .expect("answered");
        assert_eq!(rig.reply(resp_addr, used_len).0, control::status::OK);
        assert!(
            !rig.used(queue::DATA).is_empty(),
            "opcode {op}: its buffers are on the used ring"
        );
        assert!(
            data_calls.read().is_ok(),
            "opcode {op}: and the driver was notified"
        );
    }
}

/// spec: [6.6-2] a command first takes what was made available on dataq before it, kicked or
/// not: FLUSH returns those buffers, STOP puts its frames into them.
#[test]
fn a_command_takes_the_buffers_made_available_on_dataq_before_it() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1 << 20);
    rig.command(opcode::START, &[], 8);
    let posted: Vec<_> = (0..3).map(|_| rig.post_read(1 << 16)).collect();
    let (status, payload) = rig.command(opcode::FLUSH, &[], 16);
    assert_eq!(status, control::status::OK);
    let reply = FlushReply::read_from_bytes(&payload).expect("flush reply");
    assert_eq!(reply.buffers_returned.get(), 3);
    let heads: Vec<u16> = rig.used(queue::DATA).iter().map(|u| u.0).collect();
    assert_eq!(heads, posted.iter().map(|p| p.0).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(1));
    let capacity = 1 << 18;
    let (head, addr) = rig.post_read(capacity);
    rig.command(opcode::STOP, &[], 8);
    assert_eq!(rig.used(queue::DATA).last().map(|u| u.0), Some(head));
    let header = rig.assert_counter_payload(addr);
    assert!(
        header.frame_count.get() > 0,
        "STOP moved its frames into it"
    );
    let full = header.frame_count.get() as usize == capacity;
    assert!(
        full || header.flags.get() & flags::STOPPED != 0,
        "{header:?}"
    );
}

/// spec: [6.7-1] every control command, whatever its opcode and answer, is a notification
/// point for the completions coalescing still holds back.
#[test]
fn every_control_command_is_a_notification_point() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
    let coalesce = Configure {
        coalesce_buffers: 16.into(),
        ..settings(ClockMode::FreeRunning).to_wire()
    };
    rig.command(opcode::CONFIGURE, coalesce.as_bytes(), 8);
    rig.command(opcode::START, &[], 8);
    let data_calls = rig.watch_notifications(queue::DATA);
    let commands: [(u32, usize); 6] = [
        (opcode::GET_STATUS, 80),
        (opcode::RESET_COUNTERS, 8),
        (99, 8),
        (opcode::TRIGGER, 8),
        (opcode::START, 8),
        (opcode::FLUSH, 16),
    ];
    for (op, reply_len) in commands {
        rig.post_read(10);
        rig.kick(queue::DATA);
        assert!(data_calls.read().is_err(), "coalesced: no notification yet");
        rig.command(op, &[], reply_len);
        assert!(data_calls.read().is_ok(), "opcode {op} notified");
    }
}

/// spec: [6.8-1] requests made available together run one at a time, in order.
/// spec: [6.8-11] each is answered within the kick that made it available.
#[test]
fn control_requests_run_one_at_a_time_in_the_order_they_were_made_available() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    let ops = [
        opcode::GET_STATUS,
        opcode::START,
        opcode::GET_STATUS,
        opcode::STOP,
        opcode::GET_STATUS,
    ];
    let queued: Vec<(u16, u64)> = ops
        .iter()
        .map(|&op| rig.queue_command(op, 0, &[], 80))
        .collect();
    rig.kick(queue::CONTROL);
    let used = rig.used(queue::CONTROL);
    let heads: Vec<u16> = used.iter().map(|u| u.0).collect();
    assert_eq!(heads, queued.iter().map(|q| q.0).collect::<Vec<_>>());
    let states: Vec<u8> = [0, 2, 4]
        .iter()
        .map(|&i| {
            let (status, payload) = rig.reply(queued[i].1, used[i].1);
            assert_eq!(status, control::status::OK);
            Status::read_from_bytes(&payload).expect("status").state
        })
        .collect();
    let (stopped, running) = (DeviceState::Stopped as u8, DeviceState::Running as u8);
    assert_eq!(states, [stopped, running, stopped]);
}

/// spec: [6.8-2] a malformed request, one with too small a reply area, or one answered
/// BAD_SIZE is not executed: START does not start, FLUSH returns nothing.
#[test]
fn malformed_and_bad_size_requests_are_not_executed() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    rig.post_read(10);
    rig.post_read(10);
    rig.kick(queue::DATA);
    let resp = rig.alloc(4096);
    let (start, start_len) = rig.request(opcode::START, 0, &[]);
    let (long_start, long_len) = rig.request(opcode::START, 0, &[0; 4089]);
    let (short_payload, short_len) = rig.request(opcode::START, 0, &[0; 2]);
    let (flush, flush_len) = rig.request(opcode::FLUSH, 0, &[]);
    let (flush_payload, flush_payload_len) = rig.request(opcode::FLUSH, 0, &[0; 4]);
    let cases: [(&str, Chain, Option<u32>); 7] = [
        (
            "no room for a reply",
            vec![(start, start_len, R), (resp, 4, W)],
            None,
        ),
        (
            "readable after writable",
            vec![(resp, 8, W), (start, start_len, R)],
            None,
        ),
        (
            "outside guest memory",
            vec![(start, start_len, R), (MEM_SIZE as u64 - 4, 8, W)],
            None,
        ),
        (
            "request over 4096 bytes",
            vec![(long_start, long_len, R), (resp, 8, W)],
            Some(control::status::BAD_SIZE),
        ),
        (
            "START with a payload",
            vec![(short_payload, short_len, R), (resp, 8, W)],
            Some(control::status::BAD_SIZE),
        ),
        (
            "FLUSH without room for its reply",
            vec![(flush, flush_len, R), (resp, 8, W)],
            Some(control::status::BAD_SIZE),
        ),
        (
            "FLUSH with a payload",
            vec![(flush_payload, flush_payload_len, R), (resp, 16, W)],
            Some(control::status::BAD_SIZE),
        ),
    ];
    for (case, chain, answer) in cases {
        let head = rig.make_available(queue::CONTROL, &chain);
        rig.kick(queue::CONTROL);
        let used = rig.used(queue::CONTROL);
        let &(used_head, used_len) = used.last().expect("answered");
        assert_eq!(used_head, head, "{case}");
        match answer {
            None => assert_eq!(used_len, 0, "{case}"),
            Some(status) => assert_eq!(rig.reply(resp, used_len).0, status, "{case}"),
        }
        assert_eq!(rig.backend.card().state(), DeviceState::Stopped, "{case}");
        assert_eq!(rig.backend.card().buffers_held(), 2, "{case}");
        assert!(rig.used(queue::DATA).is_empty(), "{case}");
    }
    let (status, payload) = rig.command(opcode::FLUSH, &[], 16);
    assert_eq!(status, control::status::OK);
    let reply = FlushReply::read_from_bytes(&payload).expect("flush reply");
    assert_eq!(
        reply.buffers_returned.get(),
        2,
        "a good FLUSH does return them"
    );
}

/// spec: [6.8-3] reserved fields of requests (command header, CONFIGURE, SET_TRIGGER) are
/// ignored.
#[test]
fn reserved_fields_of_requests_are_ignored() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    rig.backend
        .acked_features(1 << feature::VIRTIO_F_VERSION_1 | 1 << feature::DAQ_F_TRIGGER);
    let send = |rig: &mut Rig, op: u32, payload: &[u8], reply_len: usize| {
        let before = rig.used(queue::CONTROL).len();
        let (_, resp) = rig.queue_command(op, 0xdead_beef, payload, reply_len);
        rig.kick(queue::CONTROL);
        let used_len = rig.used(queue::CONTROL)[before].1;
        rig.reply(resp, used_len)
    };
    let configure = Configure {
        channels: 3.into(),
        reserved: [0xff; 7],
        ..settings(ClockMode::Paced).to_wire()
    };
    assert_eq!(
        send(&mut rig, opcode::CONFIGURE, configure.as_bytes(), 8).0,
        control::status::OK
    );
    assert_eq!(rig.config().channels.get(), 3);
    let trigger = TriggerConfig {
        mode: trigger_mode::RISING,
        reserved: 0xff,
        post_frames: 1.into(),
        ..Default::default()
    };
    assert_eq!(
        send(&mut rig, opcode::SET_TRIGGER, trigger.as_bytes(), 8).0,
        control::status::OK
    );
    assert_eq!(send(&mut rig, opcode::START, &[], 8).0, control::status::OK);
    let (status, payload) = send(&mut rig, opcode::GET_STATUS, &[], 80);
    assert_eq!(status, control::status::OK);
    let status = Status::read_from_bytes(&payload).expect("status");
    assert_eq!(status.state, DeviceState::Running as u8);
}

/// spec: [6.9-1] events go into event buffers one per buffer, used length 32 (the rest of a
/// larger buffer untouched), in the order they occurred.
#[test]
fn events_are_written_one_per_buffer_in_order_with_used_length_32() {
    use crate::model::scenario::Action;
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    for code in [7, 8, 9] {
        rig.backend.inject(Action::Fault(code)); // raised before any buffer is posted
    }
    let mut slots = Vec::new();
    for _ in 0..4 {
        let addr = rig.alloc(64);
        rig.mem
            .write_slice(&[0x5a; 64], GuestAddress(addr))
            .expect("fill");
        slots.push((rig.make_available(queue::EVENT, &[(addr, 64, W)]), addr));
    }
    rig.kick(queue::EVENT);
    rig.backend.inject(Action::Fault(10)); // raised with a buffer waiting
    let used = rig.used(queue::EVENT);
    assert_eq!(used.len(), 4);
    for (i, ((head, addr), (used_head, used_len))) in slots.iter().zip(&used).enumerate() {
        assert_eq!((head, *used_len), (used_head, 32));
        let event = Event::read_from_bytes(&rig.read(*addr, 32)).expect("event");
        assert_eq!(event.kind.get(), kind::FAULT);
        assert_eq!(event.arg0.get(), 7 + i as u64, "in the order they occurred");
        assert_eq!(
            rig.read(addr + 32, 32),
            vec![0x5a; 32],
            "one event per buffer"
        );
    }
}

/// spec: [7-1] eventq rows: a readable descriptor or fewer than 32 writable bytes get used
/// length 0, counted, nothing written; an event that cannot be written (the memory table
/// changed under the buffer) gets used length 0 and counts in `events_lost`, not as a
/// rejected request.
#[test]
fn event_queue_rows_of_the_malformed_request_table() {
    use crate::model::scenario::Action;
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    let sentinel = rig.alloc(64);
    rig.mem
        .write_slice(&[0x5a; 64], GuestAddress(sentinel))
        .expect("fill");
    let cases = [
        vec![(sentinel, 64, R)],
        vec![(sentinel, 31, W)],
        vec![(sentinel, 16, W), (sentinel + 16, 15, W)],
    ];
    for (i, chain) in cases.iter().enumerate() {
        let head = rig.make_available(queue::EVENT, chain);
        rig.kick(queue::EVENT);
        assert_eq!(rig.used(queue::EVENT).last(), Some(&(head, 0)), "case {i}");
        assert_eq!(
            rig.config().requests_rejected.get(),
            i as u64 + 1,
            "counted"
        );
    }
    rig.backend.inject(Action::Fault(1));
    assert_eq!(rig.read(sentinel, 64), vec![0x5a; 64], "nothing written");
    rig.backend.pop_event_for_tests();
    // A buffer in the upper half of guest memory, then a memory table without it.
    let high = MEM_SIZE as u64 / 2 + 0x1000;
    let head = rig.make_available(queue::EVENT, &[(high, 32, W)]);
    rig.kick(queue::EVENT);
    let smaller = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE / 2)]).expect("memory");
    rig.backend
        .update_memory(GuestMemoryAtomic::new(smaller))
        .expect("memory table");
    rig.backend.inject(Action::Fault(2));
    assert_eq!(rig.used(queue::EVENT).last(), Some(&(head, 0)));
    let config = rig.config();
    assert_eq!(config.events_lost.get(), 1);
    assert_eq!(config.requests_rejected.get(), 3, "not counted as rejected");
}

/// spec: [7-1] [7-2] broken chains (loop, `next` beyond the table, bad indirect tables, more
/// than 64 descriptors, over 4 GiB, outside guest memory, readable after writable) get used
/// length 0 on every queue, counted, nothing written and nothing else changed; good chains
/// are served afterwards.
#[test]
fn broken_chains_on_every_queue_are_answered_with_used_length_zero_and_change_nothing_else() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    let sentinel = rig.alloc(8192);
    let tables = rig.alloc(16 * 65);
    let count = MAX_CHAIN_DESCRIPTORS + 1;
    for i in 0..count {
        let flags = if i + 1 < count { W | NEXT } else { W };
        let entry = desc(sentinel + 64 * i as u64, 64, flags, (i + 1) as u16);
        rig.mem
            .write_obj(entry, GuestAddress(tables + 16 * i as u64))
            .expect("table");
    }
    let nested = rig.alloc(16);
    rig.mem
        .write_obj(
            desc(tables, 32, VRING_DESC_F_INDIRECT as u16, 0),
            GuestAddress(nested),
        )
        .expect("table");
    let indirect = VRING_DESC_F_INDIRECT as u16;
    let cases: [(&str, RawChain); 8] = [
        (
            "loop",
            Box::new(move |head| {
                vec![
                    desc(sentinel, 64, W | NEXT, (head + 1) % QUEUE_SIZE),
                    desc(sentinel + 64, 64, W | NEXT, head),
                ]
            }),
        ),
        (
            "next beyond the table",
            Box::new(move |_| vec![desc(sentinel, 64, W | NEXT, QUEUE_SIZE + 3)]),
        ),
        (
            "indirect table of 24 bytes",
            Box::new(move |_| vec![desc(tables, 24, indirect, 0)]),
        ),
        (
            "indirect table inside an indirect table",
            Box::new(move |_| vec![desc(nested, 16, indirect, 0)]),
        ),
        (
            "65 descriptors",
            Box::new(move |_| vec![desc(tables, 16 * count as u32, indirect, 0)]),
        ),
        (
            "over 4 GiB",
            Box::new(move |head| {
                vec![
                    desc(sentinel, 64, W | NEXT, (head + 1) % QUEUE_SIZE),
                    desc(sentinel, u32::MAX, W, 0),
                ]
            }),
        ),
        (
            "outside guest memory",
            Box::new(|_| vec![desc(MEM_SIZE as u64 - 16, 64, W, 0)]),
        ),
        (
            "readable after writable",
            Box::new(move |head| {
                vec![
                    desc(sentinel, 64, W | NEXT, (head + 1) % QUEUE_SIZE),
                    desc(sentinel + 64, 64, R, 0),
                ]
            }),
        ),
    ];
    let without_rejections = |mut config: DaqConfig| {
        config.requests_rejected.set(0);
        config
    };
    let before = without_rejections(rig.config());
    let mut rejected = 0;
    for queue in [queue::DATA, queue::CONTROL, queue::EVENT] {
        for (case, chain) in &cases {
            rig.mem
                .write_slice(&[0x5a; 8192], GuestAddress(sentinel))
                .expect("fill");
            let head = rig.make_available_raw(queue, chain);
            rig.kick(queue);
            rejected += 1;
            assert_eq!(
                rig.used(queue).last(),
                Some(&(head, 0)),
                "queue {queue}: {case}"
            );
            assert_eq!(
                rig.read(sentinel, 8192),
                vec![0x5a; 8192],
                "queue {queue}: {case}: nothing written"
            );
            let config = rig.config();
            assert_eq!(config.requests_rejected.get(), rejected, "{case}: counted");
            assert_eq!(without_rejections(config), before, "{case}: nothing else");
        }
    }
    assert_eq!(rig.backend.card().buffers_held(), 0);
    // Every queue still serves good chains.
    let event = rig.alloc(32);
    rig.make_available(queue::EVENT, &[(event, 32, W)]);
    rig.kick(queue::EVENT);
    assert_eq!(rig.command(opcode::START, &[], 8).0, control::status::OK);
    let (_, addr) = rig.post_read(1 << 10);
    rig.kick(queue::DATA);
    rig.command(opcode::FLUSH, &[], 16);
    let header = rig.assert_counter_payload(addr);
    assert_eq!(header.first_frame.get(), 0);
    rig.backend.inject(crate::model::scenario::Action::Fault(5));
    assert_eq!(rig.used(queue::EVENT).last().map(|u| u.1), Some(32));
}

/// spec: [7-1] controlq rows of the malformed-request table: each answer, and whether
/// `requests_rejected` counts it.
#[test]
fn control_queue_rows_of_the_malformed_request_table() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    let resp = rig.alloc(80);
    let (short, _) = rig.request(opcode::START, 0, &[]);
    let (start, start_len) = rig.request(opcode::START, 0, &[]);
    let (long, long_len) = rig.request(opcode::START, 0, &[0; 4089]);
    // Reply area under 8 bytes: used length 0, nothing written, counted.
    rig.mem
        .write_slice(&[0x77; 8], GuestAddress(resp))
        .expect("fill");
    let head = rig.make_available(queue::CONTROL, &[(start, start_len, R), (resp, 7, W)]);
    rig.kick(queue::CONTROL);
    assert_eq!(rig.used(queue::CONTROL).last(), Some(&(head, 0)));
    assert_eq!(rig.read(resp, 8), vec![0x77; 8]);
    assert_eq!(rig.config().requests_rejected.get(), 1);
    let chains = [
        (
            "readable part under 8 bytes",
            vec![(short, 7, R), (resp, 8, W)],
        ),
        (
            "readable part over 4096 bytes",
            vec![(long, long_len, R), (resp, 8, W)],
        ),
    ];
    let mut rejected = 1;
    for (case, chain) in chains {
        let head = rig.make_available(queue::CONTROL, &chain);
        rig.kick(queue::CONTROL);
        let &(used_head, used_len) = rig.used(queue::CONTROL).last().expect("answered");
        assert_eq!((used_head, used_len), (head, 8), "{case}");
        assert_eq!(rig.reply(resp, used_len).0, control::status::BAD_SIZE);
        rejected += 1;
        assert_eq!(rig.config().requests_rejected.get(), rejected, "{case}");
    }
    let out_of_range = Configure {
        channels: 0.into(),
        ..settings(ClockMode::Paced).to_wire()
    };
    let unknown_code = Configure {
        clock: 9,
        ..settings(ClockMode::Paced).to_wire()
    };
    let rising = TriggerConfig {
        mode: trigger_mode::RISING,
        post_frames: 1.into(),
        ..Default::default()
    };
    let current = settings(ClockMode::Paced).to_wire();
    let commands: [ControlRow; 9] = [
        (
            "unknown opcode",
            77,
            &[],
            8,
            control::status::UNSUPPORTED,
            true,
        ),
        (
            "reply area too small",
            opcode::GET_STATUS,
            &[],
            79,
            control::status::BAD_SIZE,
            true,
        ),
        (
            "wrong payload size",
            opcode::STOP,
            &[0; 8],
            8,
            control::status::BAD_SIZE,
            true,
        ),
        (
            "TRIGGER without the feature",
            opcode::TRIGGER,
            &[],
            8,
            control::status::UNSUPPORTED,
            true,
        ),
        (
            "SET_TRIGGER without the feature",
            opcode::SET_TRIGGER,
            rising.as_bytes(),
            8,
            control::status::UNSUPPORTED,
            true,
        ),
        (
            "field out of range",
            opcode::CONFIGURE,
            out_of_range.as_bytes(),
            8,
            control::status::INVALID,
            false,
        ),
        (
            "unknown code",
            opcode::CONFIGURE,
            unknown_code.as_bytes(),
            8,
            control::status::INVALID,
            false,
        ),
        ("START", opcode::START, &[], 8, control::status::OK, false),
        (
            "CONFIGURE while running",
            opcode::CONFIGURE,
            current.as_bytes(),
            8,
            control::status::BUSY,
            false,
        ),
    ];
    for (case, op, payload, reply_len, status, counted) in commands {
        let before = rig.config().requests_rejected.get();
        let (answer, payload) = rig.command(op, payload, reply_len);
        assert_eq!(answer, status, "{case}");
        assert!(payload.is_empty(), "{case}: a reply header only");
        assert_eq!(
            rig.config().requests_rejected.get(),
            before + u64::from(counted),
            "{case}"
        );
    }
}

/// spec: [7-1] an available index more than the queue size ahead, on any queue, puts the
/// device in NEEDS_RESET with fault QUEUE_CORRUPT, not counted as a rejected request.
#[test]
fn a_corrupt_avail_index_on_any_queue_is_queue_corrupt_and_not_counted() {
    for queue in [queue::DATA, queue::CONTROL, queue::EVENT] {
        let mem = memory();
        let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
        rig.queues[usize::from(queue)]
            .avail()
            .idx()
            .store(QUEUE_SIZE + 1);
        rig.kick(queue);
        let config = rig.config();
        assert_eq!(config.state, DeviceState::NeedsReset as u8, "queue {queue}");
        assert_eq!(
            config.fault_code.get(),
            vdaq_wire::event::fault::QUEUE_CORRUPT
        );
        assert_eq!(config.requests_rejected.get(), 0, "queue {queue}");
    }
}

/// spec: [7-1] an event buffer made available again while the device holds it puts the
/// device in NEEDS_RESET with fault QUEUE_CORRUPT, not counted.
#[test]
fn an_event_buffer_made_available_twice_while_held_is_queue_corrupt() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    let addr = rig.alloc(32);
    rig.make_available(queue::EVENT, &[(addr, 32, W)]);
    rig.next_desc[usize::from(queue::EVENT)] = 0;
    rig.make_available(queue::EVENT, &[(addr, 32, W)]);
    rig.kick(queue::EVENT);
    let config = rig.config();
    assert_eq!(config.state, DeviceState::NeedsReset as u8);
    assert_eq!(
        config.fault_code.get(),
        vdaq_wire::event::fault::QUEUE_CORRUPT
    );
    assert_eq!(config.requests_rejected.get(), 0);
}

/// spec: [6.8-5] when several statuses apply, framing (5.x.6.8's first entry) comes before an unknown
/// opcode and before NEEDS_RESET.
#[test]
fn request_framing_comes_first_in_the_status_precedence() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    assert_eq!(
        rig.command(77, &[0; 4089], 8).0,
        control::status::BAD_SIZE,
        "over 4096 bytes, unknown opcode"
    );
    rig.queues[0].avail().idx().store(QUEUE_SIZE + 1);
    rig.kick(queue::DATA);
    assert_eq!(rig.backend.card().state(), DeviceState::NeedsReset);
    assert_eq!(
        rig.command(opcode::FLUSH, &[], 8).0,
        control::status::BAD_SIZE,
        "no room for FLUSH's reply, in NEEDS_RESET"
    );
    assert_eq!(rig.command(opcode::FLUSH, &[], 16).0, control::status::BUSY);
}

/// spec: [6.9-3] a TRIGGER event reaches eventq only after the buffer it names is on dataq's
/// used ring, also while a scripted delay holds completed buffers back.
#[test]
fn a_trigger_event_waits_for_its_buffer_even_when_completions_are_delayed() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
    rig.backend.acked_features(feature::DEVICE_FEATURES);
    let event_addr = rig.alloc(32);
    rig.make_available(queue::EVENT, &[(event_addr, 32, W)]);
    rig.kick(queue::EVENT);
    assert_eq!(rig.command(opcode::START, &[], 8).0, control::status::OK);
    assert_eq!(rig.command(opcode::TRIGGER, &[], 8).0, control::status::OK);
    rig.backend
        .inject(crate::model::scenario::Action::DelayCompletions(
            200_000_000,
        ));
    rig.post_read(10);
    rig.kick(queue::DATA);
    // The buffer carrying the trigger completed, but the delay holds it back: so is its event.
    assert!(rig.used(queue::DATA).is_empty(), "held back by the delay");
    assert!(
        rig.used(queue::EVENT).is_empty(),
        "the TRIGGER event waits for its buffer"
    );
    std::thread::sleep(Duration::from_millis(250));
    rig.kick(TIMER_EVENT);
    assert_eq!(
        rig.used(queue::DATA).len(),
        1,
        "the buffer, once the delay ended"
    );
    assert_eq!(rig.used(queue::EVENT), [(0, 32)], "then its event");
    let event = Event::read_from_bytes(&rig.read(event_addr, 32)).expect("event");
    assert_eq!(event.kind.get(), kind::TRIGGER);
    assert_eq!(event.arg1.get(), 0, "naming the buffer's sequence");
}

/// spec: [7-1] an available entry naming a descriptor beyond the table cannot be answered (a
/// used entry needs a valid id): the ring is corrupt, and the device enters NEEDS_RESET.
/// Found by fuzzing (fuzz/, data_queue).
#[test]
fn an_available_entry_beyond_the_descriptor_table_puts_the_device_in_needs_reset() {
    for queue in [queue::DATA, queue::CONTROL, queue::EVENT] {
        let mem = memory();
        let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
        let avail = rig.queues[usize::from(queue)].avail_addr();
        mem.write_obj(QUEUE_SIZE + 7, GuestAddress(avail.0 + 4))
            .expect("ring entry");
        mem.write_obj(1u16, GuestAddress(avail.0 + 2))
            .expect("avail idx");
        rig.kick(queue);
        assert_eq!(
            rig.backend.card().state(),
            DeviceState::NeedsReset,
            "queue {queue}"
        );
        assert!(
            rig.used(queue).is_empty(),
            "queue {queue}: nothing to return"
        );
    }
}

// The card breaking the protocol on purpose (scenario actions and `ctl inject`).

use crate::model::scenario::Action;
use crate::model::violations::{ConfigLie, HeaderLie, ScriptedViolation};
use vdaq_wire::config::IdentityError;

/// A free-running rig with `violation` armed, then one 100-frame read posted and completed.
/// Returns the rig, the read's head and its address.
fn complete_one_read_with(
    mem: &GuestMemoryMmap<()>,
    violation: ScriptedViolation,
) -> (Rig<'_>, u16, u64) {
    let mut rig = Rig::new(mem, ClockMode::FreeRunning, 1024);
    rig.backend.inject(Action::Violate(violation));
    let (head, addr) = rig.post_read(100);
    rig.kick(queue::DATA);
    assert_eq!(rig.command(opcode::START, &[], 8).0, control::status::OK);
    (rig, head, addr)
}

const READ_LEN: u32 = (HEADER_SIZE + 100 * 8) as u32;

#[test]
fn scripted_used_lengths_lie_over_the_buffer_and_under_the_header() {
    let mem = memory();
    let (rig, head, _) = complete_one_read_with(&mem, ScriptedViolation::UsedLenOverBuffer);
    assert_eq!(rig.used(queue::DATA), vec![(head, READ_LEN + 64)]);
    let mem = memory();
    let (rig, head, _) = complete_one_read_with(&mem, ScriptedViolation::UsedLenUnderHeader);
    assert_eq!(rig.used(queue::DATA), vec![(head, HEADER_SIZE as u32 / 2)]);
}

#[test]
fn scripted_used_ids_name_no_descriptor_or_one_not_in_flight_or_repeat() {
    let mem = memory();
    let (rig, head, _) = complete_one_read_with(&mem, ScriptedViolation::UsedIdOutOfRange);
    assert_eq!(
        rig.used(queue::DATA),
        vec![(QUEUE_SIZE, READ_LEN), (head, READ_LEN)]
    );
    let mem = memory();
    let (rig, head, _) = complete_one_read_with(&mem, ScriptedViolation::UsedIdNotInFlight);
    let used = rig.used(queue::DATA);
    assert_eq!(used.len(), 2);
    assert_ne!(used[0].0, head, "names another descriptor");
    assert!(used[0].0 < QUEUE_SIZE, "in range");
    assert_eq!(used[1], (head, READ_LEN));
    let mem = memory();
    let (rig, head, _) = complete_one_read_with(&mem, ScriptedViolation::CompleteTwice);
    assert_eq!(
        rig.used(queue::DATA),
        vec![(head, READ_LEN), (head, READ_LEN)]
    );
}

#[test]
fn a_scripted_used_index_jump_moves_the_index_with_nothing_written_and_keeps_counting() {
    let mem = memory();
    let (mut rig, _, _) = complete_one_read_with(&mem, ScriptedViolation::UsedIndexJump(0));
    let used = rig.queues[usize::from(queue::DATA)].used();
    assert_eq!(used.idx().load(), 1 + QUEUE_SIZE, "jumps by the queue size");
    rig.post_read(100);
    rig.kick(queue::DATA);
    let used = rig.queues[usize::from(queue::DATA)].used();
    assert_eq!(
        used.idx().load(),
        2 + QUEUE_SIZE,
        "later entries follow the jump"
    );
    let mem = memory();
    let (rig, _, _) = complete_one_read_with(&mem, ScriptedViolation::UsedIndexJump(3));
    assert_eq!(rig.queues[usize::from(queue::DATA)].used().idx().load(), 4);
}

#[test]
fn scripted_header_lies_change_exactly_their_field_of_the_next_buffer_with_frames() {
    let truth = {
        let mem = memory();
        let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
        let (_, addr) = rig.post_read(100);
        rig.kick(queue::DATA);
        rig.command(opcode::START, &[], 8);
        rig.header_at(addr)
    };
    for lie in [
        HeaderLie::FrameCount,
        HeaderLie::Channels,
        HeaderLie::Format,
        HeaderLie::Sequence,
        HeaderLie::FirstFrame,
        HeaderLie::Timestamp,
    ] {
        let mem = memory();
        let (mut rig, _, addr) = complete_one_read_with(&mem, ScriptedViolation::Header(lie));
        let header = rig.header_at(addr);
        let mut expected = truth;
        expected.timestamp_ns = header.timestamp_ns;
        expected.crc32 = header.crc32;
        match lie {
            HeaderLie::FrameCount => expected.frame_count.set(101),
            HeaderLie::Channels => expected.channels.set(3),
            HeaderLie::Format => expected.format = SampleFormat::F32 as u8,
            HeaderLie::Sequence => expected.sequence.set(1),
            HeaderLie::FirstFrame => expected.first_frame.set(1),
            HeaderLie::Timestamp => assert_eq!(header.timestamp_ns.get(), 0),
        }
        assert_eq!(header, expected, "{lie:?}");
        // Only one buffer lies: the next one tells the truth.
        let (_, next) = rig.post_read(100);
        rig.kick(queue::DATA);
        let next = rig.header_at(next);
        assert_eq!(
            (
                next.sequence.get(),
                next.first_frame.get(),
                next.channels.get()
            ),
            (1, 100, 2),
            "{lie:?}"
        );
    }
}

#[test]
fn scripted_replies_are_short_long_of_undefined_status_or_never_sent() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    let reply_len = 8 + 80;
    let answer = |rig: &mut Rig<'_>, violation: ScriptedViolation| {
        rig.backend.inject(Action::Violate(violation));
        let before = rig.used(queue::CONTROL).len();
        let (head, resp_addr) = rig.queue_command(opcode::GET_STATUS, 0, &[], reply_len);
        rig.kick(queue::CONTROL);
        let used = rig.used(queue::CONTROL);
        (head, resp_addr, used[before..].to_vec())
    };
    let (head, _, used) = answer(&mut rig, ScriptedViolation::ReplyShort);
    assert_eq!(used, vec![(head, 4)]);
    let (head, _, used) = answer(&mut rig, ScriptedViolation::ReplyLong);
    assert_eq!(used, vec![(head, reply_len as u32 + 64)]);
    let (head, resp, used) = answer(&mut rig, ScriptedViolation::ReplyBadStatus);
    assert_eq!(used, vec![(head, 8 + 72)]);
    assert_eq!(rig.reply(resp, used[0].1).0, 0xbad);
    let (_, _, used) = answer(&mut rig, ScriptedViolation::ReplyNever);
    assert!(used.is_empty(), "never answered: {used:?}");
    assert_eq!(rig.backend.withheld(), (1, 0));
    // The next command is answered as usual.
    let (status, _) = rig.command(opcode::GET_STATUS, &[], reply_len);
    assert_eq!(status, 0);
}

#[test]
fn a_scripted_impossible_config_space_fails_identification_and_survives_reset() {
    for (lie, expected) in [
        (ConfigLie::Channels, IdentityError::Channels(0)),
        (
            ConfigLie::MaxChannels,
            IdentityError::MaxChannels(vdaq_wire::MAX_CHANNELS + 1),
        ),
        (ConfigLie::Format, IdentityError::Format(0xee)),
        (ConfigLie::Rate, IdentityError::Rates),
        (ConfigLie::Fifo, IdentityError::Fifo),
        (
            ConfigLie::Firmware,
            IdentityError::FirmwareMajor(vdaq_wire::FIRMWARE_VERSION + (1 << 16)),
        ),
        (ConfigLie::Model, IdentityError::Model),
        (ConfigLie::State, IdentityError::State(0xee)),
    ] {
        let mem = memory();
        let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
        assert!(rig.config().identify().is_ok());
        rig.backend
            .inject(Action::Violate(ScriptedViolation::Config(lie)));
        assert_eq!(
            rig.config().identify().map(|_| ()),
            Err(expected),
            "{lie:?}"
        );
        rig.backend.reset_device();
        assert_eq!(
            rig.config().identify().map(|_| ()),
            Err(expected),
            "{lie:?} after reset"
        );
    }
}

#[test]
fn a_scripted_unknown_event_reaches_the_event_queue() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    let event_addr = rig.alloc(32);
    rig.make_available(queue::EVENT, &[(event_addr, 32, W)]);
    rig.kick(queue::EVENT);
    rig.backend
        .inject(Action::Violate(ScriptedViolation::UnknownEvent));
    assert_eq!(rig.used(queue::EVENT), vec![(0, 32)]);
    let event = Event::read_from_bytes(&rig.read(event_addr, 32)).expect("event");
    assert_eq!(
        event.kind.get(),
        crate::model::violations::UNKNOWN_EVENT_KIND
    );
}

#[test]
fn scripted_interrupt_storms_and_silence() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::FreeRunning, 1024);
    rig.command(opcode::START, &[], 8);
    let calls = rig.watch_notifications(queue::DATA);
    rig.backend
        .inject(Action::Violate(ScriptedViolation::InterruptStorm(7)));
    assert_eq!(
        calls.read().expect("storm"),
        7,
        "7 interrupts, nothing used"
    );
    assert!(rig.used(queue::DATA).is_empty());
    // A longer storm comes in bursts, one per clock tick, so the device keeps answering.
    rig.backend
        .inject(Action::Violate(ScriptedViolation::InterruptStorm(50)));
    assert_eq!(calls.read().expect("first burst"), 20);
    rig.kick(TIMER_EVENT);
    assert_eq!(calls.read().expect("second burst"), 20);
    rig.kick(TIMER_EVENT);
    assert_eq!(calls.read().expect("the rest"), 10);
    rig.kick(TIMER_EVENT);
    assert!(calls.read().is_err(), "the storm is over");
    rig.backend
        .inject(Action::Violate(ScriptedViolation::NoInterrupts(
            60 * 1_000_000_000,
        )));
    let (head, _) = rig.post_read(100);
    rig.kick(queue::DATA);
    assert_eq!(rig.used(queue::DATA), vec![(head, READ_LEN)]);
    assert!(calls.read().is_err(), "no interrupt for the completion");
    assert!(rig.backend.withheld().1 >= 1);
}

/// The frontend's end of the backend-request channel, read raw.
struct BackendChannel {
    socket: std::os::unix::net::UnixStream,
}

/// vhost-user header flags: version 1, and the reply bit.
const VHOST_USER_VERSION: u32 = 0x1;
const VHOST_USER_REPLY: u32 = 0x4;
const VHOST_USER_NEED_REPLY: u32 = 0x8;

impl BackendChannel {
    fn attach(backend: &mut DaqBackend, reply_ack: bool) -> Self {
        let (frontend_end, backend_end) =
            std::os::unix::net::UnixStream::pair().expect("socket pair");
        let channel = vhost::vhost_user::Backend::from_stream(backend_end);
        channel.set_reply_ack_flag(reply_ack);
        backend.set_backend_req_fd(channel);
        frontend_end
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("read timeout");
        BackendChannel {
            socket: frontend_end,
        }
    }

    /// The next message's (request, flags), or None if none came within the read timeout.
    fn next(&mut self) -> Option<(u32, u32)> {
        use std::io::Read;
        let mut header = [0u8; 12];
        self.socket.read_exact(&mut header).ok()?;
        let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
        let mut body = vec![0u8; word(8) as usize];
        self.socket.read_exact(&mut body).expect("message body");
        Some((word(0), word(4)))
    }

    /// Answers `request` as QEMU does with REPLY_ACK: success.
    fn ack(&mut self, request: u32) {
        use std::io::Write;
        let mut reply = Vec::new();
        reply.extend_from_slice(&request.to_le_bytes());
        reply.extend_from_slice(&(VHOST_USER_VERSION | VHOST_USER_REPLY).to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&0u64.to_le_bytes());
        self.socket.write_all(&reply).expect("ack");
    }
}

const CONFIG_CHANGE_MSG: u32 = 2;

/// spec: [6.13-8] QEMU's generic vhost-user device crashes on a configuration-change message while the
/// device is stopped (notify.rs): a change made then waits for the frontend to start every
/// ring, and a reset drops it (the next driver reads the whole space).
#[test]
fn config_changes_wait_for_the_frontend_to_run_the_device_and_a_reset_drops_them() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 64);
    let mut channel = BackendChannel::attach(&mut rig.backend, false);
    rig.backend.adjust(Some(2_000), None, None).expect("adjust");
    assert_eq!(
        channel.next(),
        None,
        "not sent before the backend has seen the frontend start the rings"
    );
    rig.kick(queue::EVENT);
    assert_eq!(
        channel.next().map(|(request, _)| request),
        Some(CONFIG_CHANGE_MSG),
        "sent once every ring is started and enabled"
    );

    // SET_VRING_ENABLE 0 on one ring (QEMU's first step when it stops the device).
    rig.vrings[usize::from(queue::EVENT)].set_enabled(false);
    rig.backend.adjust(Some(2_500), None, None).expect("adjust");
    rig.kick(queue::DATA);
    assert_eq!(
        channel.next(),
        None,
        "held while a started ring is disabled"
    );
    rig.vrings[usize::from(queue::EVENT)].set_enabled(true);
    rig.kick(queue::DATA);
    assert_eq!(
        channel.next().map(|(request, _)| request),
        Some(CONFIG_CHANGE_MSG),
        "the held change goes out once the ring is enabled again"
    );

    // GET_VRING_BASE: vhost-user-backend marks the ring not ready, then stops it.
    rig.vrings[usize::from(queue::DATA)].set_queue_ready(false);
    rig.backend
        .stop_vring(u32::from(queue::DATA))
        .expect("stop");
    rig.backend.adjust(Some(3_000), None, None).expect("adjust");
    rig.kick(queue::EVENT);
    assert_eq!(channel.next(), None, "held while a ring is stopped");
    rig.backend.reset_device();
    rig.vrings[usize::from(queue::DATA)].set_queue_ready(true);
    rig.kick(queue::EVENT);
    assert_eq!(channel.next(), None, "the reset dropped the held change");
    rig.backend.adjust(Some(4_000), None, None).expect("adjust");
    assert_eq!(
        channel.next().map(|(request, _)| request),
        Some(CONFIG_CHANGE_MSG),
        "running again: sent at once"
    );
}

/// A paced rig whose backend-request channel waits for answers (REPLY_ACK), with one event
/// buffer posted; returns the rig, the frontend's end of the channel and the event buffer.
fn announcing_rig(mem: &GuestMemoryMmap<()>) -> (Rig<'_>, BackendChannel, u64) {
    let mut rig = Rig::new(mem, ClockMode::Paced, 64);
    let channel = BackendChannel::attach(&mut rig.backend, true);
    let event_addr = rig.alloc(EVENT_SIZE as u64);
    rig.make_available(queue::EVENT, &[(event_addr, EVENT_SIZE as u32, W)]);
    rig.kick(queue::EVENT);
    (rig, channel, event_addr)
}

/// Runs the backend's clock until `done` or five seconds pass; true if `done`.
fn tick_until(rig: &mut Rig<'_>, mut done: impl FnMut(&Rig<'_>) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        rig.kick(TIMER_EVENT);
        if done(rig) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// spec: [6.13-9] on NEEDS_RESET the configuration-change notification comes first: until the
/// frontend has taken it, the fault shows only in the config space (no event, no reply), so
/// the driver cannot reset the device with the message still unread.
#[test]
fn needs_reset_shows_only_in_the_config_space_until_the_frontend_took_the_notification() {
    use crate::model::scenario::Action;
    let mem = memory();
    let (mut rig, mut channel, event_addr) = announcing_rig(&mem);

    let injected = Instant::now();
    rig.backend.inject(Action::NeedsReset);
    assert_eq!(rig.config().state, DeviceState::NeedsReset as u8);
    let (request, flags) = channel.next().expect("the notification went out");
    assert_eq!(request, CONFIG_CHANGE_MSG);
    assert_ne!(
        flags & VHOST_USER_NEED_REPLY,
        0,
        "REPLY_ACK: it waits for the frontend"
    );
    let (_, reply_addr) = rig.queue_command(opcode::GET_STATUS, 0, &[], 80);
    rig.kick(queue::CONTROL);
    rig.kick(TIMER_EVENT);
    // (Past the announce timeout, on a badly loaded machine, the device rightly shows it.)
    if injected.elapsed() < Duration::from_nanos(notify::ANNOUNCE_TIMEOUT_NS) {
        assert!(
            rig.used(queue::EVENT).is_empty(),
            "no NEEDS_RESET event yet"
        );
        assert!(rig.used(queue::CONTROL).is_empty(), "no command reply yet");
    }

    channel.ack(CONFIG_CHANGE_MSG);
    assert!(
        tick_until(&mut rig, |rig| !rig.used(queue::EVENT).is_empty()),
        "the event follows the frontend's answer"
    );
    let event = Event::read_from_bytes(&rig.read(event_addr, EVENT_SIZE)).expect("event");
    assert_eq!(event.kind.get(), kind::NEEDS_RESET);
    let replies = rig.used(queue::CONTROL);
    assert_eq!(replies.len(), 1, "the deferred command is answered");
    assert_eq!(rig.reply(reply_addr, replies[0].1).0, control::status::OK);
}

/// A frontend that never answers the NEEDS_RESET notification does not freeze the device: the
/// fault is shown after the announce timeout.
#[test]
fn needs_reset_is_shown_anyway_when_the_frontend_never_answers() {
    use crate::model::scenario::Action;
    let mem = memory();
    let (mut rig, mut channel, _) = announcing_rig(&mem);
    let injected = Instant::now();
    rig.backend.inject(Action::NeedsReset);
    assert!(channel.next().is_some(), "the notification went out");
    assert!(
        tick_until(&mut rig, |rig| !rig.used(queue::EVENT).is_empty()),
        "the event is delivered without an answer"
    );
    assert!(
        injected.elapsed() >= Duration::from_nanos(notify::ANNOUNCE_TIMEOUT_NS),
        "not before the timeout"
    );
}

/// spec: [6.13-9] a fault the data queue finds while a command waits (the command's own kick
/// takes the data buffers first) is announced before the command is answered.
#[test]
fn a_fault_found_before_a_command_is_announced_before_the_reply() {
    let mem = memory();
    let mut rig = Rig::new(&mem, ClockMode::Paced, 1024);
    let mut channel = BackendChannel::attach(&mut rig.backend, true);
    let addr = rig.alloc(4096);
    rig.make_available(queue::DATA, &[(addr, 4096, W)]);
    rig.kick(queue::DATA);
    // The same chain made available again while held: NEEDS_RESET when dataq is next read,
    // which the control kick below does before it answers.
    rig.next_desc[0] = 0;
    rig.make_available(queue::DATA, &[(addr, 4096, W)]);
    let injected = Instant::now();
    let (_, reply_addr) = rig.queue_command(opcode::GET_STATUS, 0, &[], 80);
    rig.kick(queue::CONTROL);
    assert_eq!(rig.backend.card().state(), DeviceState::NeedsReset);
    let (request, _) = channel.next().expect("the notification went out");
    assert_eq!(request, CONFIG_CHANGE_MSG);
    if injected.elapsed() < Duration::from_nanos(notify::ANNOUNCE_TIMEOUT_NS) {
        assert!(
            rig.used(queue::CONTROL).is_empty(),
            "no reply before the frontend's answer"
        );
    }
    channel.ack(CONFIG_CHANGE_MSG);
    assert!(
        tick_until(&mut rig, |rig| !rig.used(queue::CONTROL).is_empty()),
        "the command is answered after the frontend's answer"
    );
    let replies = rig.used(queue::CONTROL);
    assert_eq!(rig.reply(reply_addr, replies[0].1).0, control::status::OK);
}
