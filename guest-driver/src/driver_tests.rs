//! Unit tests of [`DaqDriver`] against the scripted fake device ([`crate::fake`]): feature
//! negotiation, commands, reads, events, recovery and shutdown, and above all the answers a
//! correct device never gives — unknown ids, impossible used lengths, lying headers, short or
//! malformed replies — each checked for the driver's exact outcome.

extern crate std;

use alloc::vec;
use alloc::vec::Vec;

use vdaq_wire::buffer::{flags, status as buffer_status, BufferHeader, HEADER_SIZE};
use vdaq_wire::config::{DaqConfig, IdentityError};
use vdaq_wire::control::{
    self, command_payload_size, opcode, reply_payload_size, status, Configure, FlushReply,
    ResponseHeader, Status,
};
use vdaq_wire::event::{kind, Event, EVENT_SIZE};
use vdaq_wire::violation::Violation;
use vdaq_wire::{feature, queue, DeviceState as DaqState, SampleFormat};
use virtio_drivers::transport::DeviceStatus;
use zerocopy::{FromZeros, IntoBytes};

use crate::fake::device::DESC_F_WRITE;
use crate::fake::{self, hal, FakeDaqTransport, FakeDevice, FakeHal, FakeWait, CAUSE_USED_BUFFER};
use crate::{
    DaqDriver, DmaBuffer, DriverError, DriverOptions, ReadOutcome, RequestId, DATA_QUEUE_SIZE,
};

type Driver = DaqDriver<FakeHal, FakeDaqTransport>;
type Buffer = DmaBuffer<FakeHal>;

/// The rig's stream: 2 channels of s32, 8 bytes a frame.
const FORMAT: SampleFormat = SampleFormat::S32;
const CHANNELS: u16 = 2;
const FRAME: usize = 8;
/// A read buffer of 16 frames.
const FRAMES: usize = 16;
const READ_LEN: usize = HEADER_SIZE + FRAMES * FRAME;

const CONTROL_QUEUE_SIZE: u32 = 8;
const EVENT_QUEUE_SIZE: u32 = 16;
const EVENT_BUFFERS: u16 = 8;
/// What `command_raw` offers for a reply: header + its largest reply payload.
const REPLY_AREA: usize = size_of::<ResponseHeader>() + 128;

fn bit(n: u32) -> u64 {
    1 << n
}

fn init_status() -> DeviceStatus {
    DeviceStatus::ACKNOWLEDGE
        | DeviceStatus::DRIVER
        | DeviceStatus::FEATURES_OK
        | DeviceStatus::DRIVER_OK
}

struct Rig {
    device: FakeDevice,
    driver: Driver,
}

fn try_rig(
    features: u64,
    options: DriverOptions,
    setup: impl FnOnce(&FakeDevice),
) -> (FakeDevice, Result<Driver, DriverError>) {
    let (device, transport) = FakeDevice::new(features, &fake::config(FORMAT, CHANNELS));
    setup(&device);
    let driver = DaqDriver::new(transport, device.irq(), options);
    (device, driver)
}

fn rig() -> Rig {
    let (device, driver) = try_rig(feature::DEVICE_FEATURES, DriverOptions::default(), |_| {});
    Rig {
        device,
        driver: driver.expect("driver init"),
    }
}

/// An OK header for `frames` frames of the rig's stream.
fn header(sequence: u64, frames: usize) -> BufferHeader {
    BufferHeader {
        sequence: sequence.into(),
        first_frame: (sequence * FRAMES as u64).into(),
        frame_count: (frames as u32).into(),
        status: buffer_status::OK,
        format: FORMAT as u8,
        channels: CHANNELS.into(),
        rate_hz: 48_000.into(),
        ..Default::default()
    }
}

fn used_len(header: &BufferHeader) -> u32 {
    (HEADER_SIZE + header.payload_bytes().expect("known format")) as u32
}

/// A payload whose bytes name their position, to see which buffer got which data.
fn payload(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| tag ^ (i as u8)).collect()
}

impl Rig {
    fn submit(&mut self, len: usize) -> RequestId {
        self.driver
            .submit_read(Buffer::new(len))
            .map_err(|(err, _)| err)
            .expect("submit")
    }

    /// Submits a read, the device fills it with `header` + payload and returns it with
    /// `used`, raises the interrupt; the bottom half runs. Returns the completion.
    fn read_answered(
        &mut self,
        header: &BufferHeader,
        used: u32,
    ) -> (RequestId, crate::Completion<FakeHal>) {
        let id = self.submit(READ_LEN);
        let chain = self.device.take_read();
        self.device
            .fill_read(&chain, header, &payload(0x5a, READ_LEN - HEADER_SIZE));
        self.device.complete(&chain, used);
        self.device.interrupt(CAUSE_USED_BUFFER);
        self.driver.service();
        let done = self.driver.next_completion().expect("a completion");
        assert!(self.driver.next_completion().is_none());
        assert_eq!(done.id, id);
        assert_eq!(done.used_len, used as usize);
        assert_eq!(done.buffer.len(), READ_LEN, "the buffer comes back whole");
        (id, done)
    }

    fn outcome(&mut self, header: &BufferHeader, used: u32) -> ReadOutcome {
        self.read_answered(header, used).1.outcome
    }
}

// ---------------------------------------------------------------------------------------------
// Initialisation and feature negotiation
// ---------------------------------------------------------------------------------------------

/// spec: [3-4] the driver accepts VIRTIO_F_VERSION_1 (and writes it back).
#[test]
fn init_negotiates_version_1_and_event_idx_and_sets_up_three_queues() {
    let rig = rig();
    let expected = bit(feature::VIRTIO_F_VERSION_1) | bit(feature::VIRTIO_F_EVENT_IDX);
    assert_eq!(rig.driver.features(), expected);
    rig.device.with_state(|s| {
        assert_eq!(s.driver_features, vec![expected], "features written once");
        assert_eq!(
            s.status_writes,
            vec![
                DeviceStatus::empty(),
                DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER,
                DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK,
                init_status(),
            ],
            "virtio 3.1.1 order"
        );
        assert_eq!(s.status, init_status());
        assert!(s.bad_queue_indices.is_empty());
        assert_eq!(s.config_writes, 0, "the config space is read-only");
    });
    assert_eq!(rig.device.queue(queue::DATA).size, DATA_QUEUE_SIZE as u32);
    assert_eq!(rig.device.queue(queue::CONTROL).size, CONTROL_QUEUE_SIZE);
    assert_eq!(rig.device.queue(queue::EVENT).size, EVENT_QUEUE_SIZE);
    for index in [queue::DATA, queue::CONTROL, queue::EVENT] {
        let q = rig.device.queue(index);
        assert!(hal::is_live_dma(q.descriptors, 16 * q.size as usize));
        assert!(hal::is_live_dma(q.driver_area, 6 + 2 * q.size as usize));
        assert!(hal::is_live_dma(q.device_area, 6 + 8 * q.size as usize));
    }
    assert_eq!(rig.driver.frame_bytes(), FRAME);
    assert_eq!(rig.driver.in_flight(), 0);
    assert!(!rig.driver.needs_reset());
    assert!(!rig.device.line().is_masked(), "init unmasks the line");
}

#[test]
fn init_posts_device_writable_event_buffers_of_one_event() {
    let rig = rig();
    assert_eq!(rig.device.avail_pending(queue::EVENT), EVENT_BUFFERS);
    assert_eq!(rig.device.avail_pending(queue::DATA), 0);
    assert_eq!(rig.device.avail_pending(queue::CONTROL), 0);
    for _ in 0..EVENT_BUFFERS {
        let chain = rig.device.take_event_buffer();
        assert_eq!(chain.descriptors.len(), 1);
        assert_eq!(chain.readable_len(), 0);
        assert_eq!(chain.writable_len(), EVENT_SIZE);
    }
}

#[test]
fn init_asks_for_crc_and_trigger_only_when_told_and_only_if_offered() {
    let options = DriverOptions {
        crc: true,
        trigger: true,
    };
    let (_, driver) = try_rig(feature::DEVICE_FEATURES, options, |_| {});
    let features = driver.expect("init").features();
    assert_eq!(
        features,
        bit(feature::VIRTIO_F_VERSION_1)
            | bit(feature::VIRTIO_F_EVENT_IDX)
            | bit(feature::DAQ_F_CRC32)
            | bit(feature::DAQ_F_TRIGGER)
    );
    assert_eq!(
        features & bit(feature::VIRTIO_F_INDIRECT_DESC),
        0,
        "indirect descriptors are never asked for"
    );

    let offered = bit(feature::VIRTIO_F_VERSION_1) | bit(feature::DAQ_F_TRIGGER);
    let (device, driver) = try_rig(offered, options, |_| {});
    let driver = driver.expect("init");
    assert_eq!(driver.features(), offered, "CRC and EVENT_IDX not offered");
    device.with_state(|s| assert_eq!(s.driver_features, vec![offered]));
}

#[test]
fn init_fails_with_missing_feature_when_version_1_is_not_offered() {
    let offered = feature::DEVICE_FEATURES & !bit(feature::VIRTIO_F_VERSION_1);
    let (device, driver) = try_rig(offered, DriverOptions::default(), |_| {});
    assert!(matches!(
        driver,
        Err(DriverError::MissingFeature(feature::VIRTIO_F_VERSION_1))
    ));
    device.with_state(|s| {
        assert!(s.status.contains(DeviceStatus::FAILED), "{:?}", s.status);
        assert!(s
            .status_writes
            .iter()
            .all(|w| !w.contains(DeviceStatus::DRIVER_OK)));
        assert!(s.queues.iter().all(|q| q.size == 0), "no queue set up");
    });
}

/// spec: [3-6] FEATURES_OK is read back; the driver gives up when it did not stay set.
#[test]
fn init_fails_when_the_device_refuses_the_feature_set() {
    let (device, driver) = try_rig(
        feature::DEVICE_FEATURES,
        DriverOptions::default(),
        |device| device.with_state(|s| s.refuse_features = true),
    );
    let driven_to_driver_ok = device.with_state(|s| {
        s.status_writes
            .iter()
            .any(|w| w.contains(DeviceStatus::DRIVER_OK))
    });
    assert!(
        driver.is_err(),
        "init must fail when FEATURES_OK does not stick"
    );
    assert!(!driven_to_driver_ok, "DRIVER_OK must not be set");
    assert!(device.status().contains(DeviceStatus::FAILED));
}

#[test]
fn init_fails_on_an_unknown_sample_format_before_any_queue_exists() {
    let (device, transport) = FakeDevice::new(feature::DEVICE_FEATURES, &{
        let mut config = fake::config(FORMAT, CHANNELS);
        config.format = 0;
        config
    });
    let driver = Driver::new(transport, device.irq(), DriverOptions::default());
    assert!(matches!(
        driver,
        Err(DriverError::NotVdaq(IdentityError::Format(0)))
    ));
    assert_eq!(device.status(), DeviceStatus::FAILED);
    device.with_state(|s| assert!(s.queues.iter().all(|q| q.size == 0)));
}

/// spec: [1-1] ID 21 is also another device type's: the driver checks the identity first.
#[test]
fn init_refuses_a_device_that_is_not_a_vdaq_card() {
    type Case = (&'static str, fn(&mut DaqConfig), IdentityError);
    let cases: [Case; 4] = [
        (
            "another device with ID 21 (its config is not ours)",
            |c| *c = DaqConfig::new_zeroed(),
            IdentityError::FirmwareMajor(0),
        ),
        (
            "the next major firmware version",
            |c| c.firmware_version.set(2 << 16),
            IdentityError::FirmwareMajor(2 << 16),
        ),
        (
            "more channels than the card has",
            |c| c.channels.set(c.max_channels.get() + 1),
            IdentityError::Channels(17),
        ),
        (
            "a model name that is no text",
            |c| c.model[0] = 0xff,
            IdentityError::Model,
        ),
    ];
    for (what, spoil, expected) in cases {
        let mut config = fake::config(FORMAT, CHANNELS);
        spoil(&mut config);
        let (device, transport) = FakeDevice::new(feature::DEVICE_FEATURES, &config);
        let driver = Driver::new(transport, device.irq(), DriverOptions::default());
        match driver {
            Err(DriverError::NotVdaq(found)) => assert_eq!(found, expected, "{what}"),
            other => panic!("{what}: {:?}", other.map(|_| ())),
        }
        assert_eq!(device.status(), DeviceStatus::FAILED, "{what}");
        assert!(
            !device.status().contains(DeviceStatus::DRIVER_OK),
            "{what}: never used"
        );
    }
    let mut newer_minor = fake::config(FORMAT, CHANNELS);
    newer_minor
        .firmware_version
        .set(vdaq_wire::FIRMWARE_VERSION + 3);
    let (device, transport) = FakeDevice::new(feature::DEVICE_FEATURES, &newer_minor);
    assert!(
        Driver::new(transport, device.irq(), DriverOptions::default()).is_ok(),
        "a newer minor firmware is the same interface"
    );
}

#[test]
fn init_fails_on_a_config_space_shorter_than_the_vdaq_layout() {
    let mut bytes = fake::config(FORMAT, CHANNELS).as_bytes().to_vec();
    bytes.truncate(64);
    let (device, transport) = FakeDevice::with_config_bytes(feature::DEVICE_FEATURES, bytes);
    let driver = Driver::new(transport, device.irq(), DriverOptions::default());
    assert!(matches!(
        driver,
        Err(DriverError::Virtio(
            virtio_drivers::Error::ConfigSpaceTooSmall
        ))
    ));
    assert_eq!(device.status(), DeviceStatus::FAILED, "given up");
    device.with_state(|s| assert!(s.queues.iter().all(|q| q.size == 0)));
}

#[test]
fn init_fails_when_the_data_queue_cannot_be_256_deep() {
    let (device, driver) = try_rig(feature::DEVICE_FEATURES, DriverOptions::default(), |d| {
        d.with_state(|s| s.max_queue_size[usize::from(queue::DATA)] = 128)
    });
    assert!(matches!(
        driver,
        Err(DriverError::Virtio(virtio_drivers::Error::InvalidParam))
    ));
    device.with_state(|s| assert!(s.queues.iter().all(|q| q.size == 0)));
}

#[test]
fn init_failure_after_a_queue_is_set_up_leaves_no_ring_registered() {
    let (device, driver) = try_rig(feature::DEVICE_FEATURES, DriverOptions::default(), |d| {
        d.with_state(|s| s.max_queue_size[usize::from(queue::CONTROL)] = 4)
    });
    assert!(matches!(
        driver,
        Err(DriverError::Virtio(virtio_drivers::Error::InvalidParam))
    ));
    let (status, data) = device.with_state(|s| (s.status, s.queues[usize::from(queue::DATA)]));
    let freed = data.size != 0 && !hal::is_live_dma(data.descriptors, 16);
    assert!(
        !freed,
        "queue 0 is still registered at {:#x}, which was freed (status {status:?})",
        data.descriptors
    );
    assert!(
        status.contains(DeviceStatus::FAILED) || status.is_empty(),
        "the device must be failed or reset, is {status:?}"
    );
}

#[test]
fn dropping_the_driver_resets_the_device() {
    let rig = rig();
    let device = rig.device.clone();
    drop(rig);
    assert_eq!(device.status(), DeviceStatus::empty());
    device.with_state(|s| {
        assert_eq!(s.resets, 2, "one reset in begin_init, one at drop");
        assert!(s.queues.iter().all(|q| q.size == 0));
    });
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

#[test]
fn command_round_trip_follows_the_wire_format() {
    let mut rig = rig();
    let answer = Status {
        device_time_ns: 123.into(),
        frames_produced: 7.into(),
        buffers_held: 2.into(),
        state: DaqState::Stopped as u8,
        ..Default::default()
    };
    let mut wait = FakeWait::new(&rig.device).then(move |device| {
        let command = device.take_command();
        let chain = &command.chain;
        assert!(chain.is_well_ordered(), "readable before writable");
        assert_eq!(command.opcode(), opcode::GET_STATUS);
        assert_eq!(command.header.reserved.get(), 0);
        assert_eq!(
            chain.readable_len(),
            size_of::<control::CommandHeader>()
                + command_payload_size(opcode::GET_STATUS).expect("known")
        );
        assert!(
            chain.writable_len()
                >= size_of::<ResponseHeader>() + reply_payload_size(opcode::GET_STATUS)
        );
        assert_eq!(chain.writable_len(), REPLY_AREA);
        device.reply(&command, status::OK, answer.as_bytes());
    });
    let got = rig.driver.status(&mut wait).expect("GET_STATUS");
    assert_eq!(got, answer);
    assert_eq!(wait.waits, 1);
    rig.device.with_state(|s| {
        assert_eq!(s.notifications[usize::from(queue::CONTROL)], 1);
    });
    assert!(!rig.device.line().is_masked());
}

#[test]
fn configure_sends_its_payload_and_refreshes_the_frame_size() {
    let mut rig = rig();
    let settings = Configure {
        rate_hz: 1000.into(),
        latency_us: 100.into(),
        watermark_frames: 8.into(),
        channels: 4.into(),
        coalesce_buffers: 1.into(),
        format: SampleFormat::S16 as u8,
        ..Default::default()
    };
    let mut wait = FakeWait::new(&rig.device).then(move |device| {
        let command = device.take_command();
        assert_eq!(command.opcode(), opcode::CONFIGURE);
        assert_eq!(command.payload, settings.as_bytes());
        device.set_config(|c| {
            c.channels = 4.into();
            c.format = SampleFormat::S16 as u8;
        });
        device.reply(&command, status::OK, &[]);
    });
    rig.driver
        .configure(&settings, &mut wait)
        .expect("CONFIGURE");
    assert_eq!(rig.driver.frame_bytes(), 4 * 2);
}

/// spec: [3-5] no TRIGGER or SET_TRIGGER without VIRTIO_DAQ_F_TRIGGER.
#[test]
fn trigger_commands_are_refused_without_the_feature_and_nothing_is_sent() {
    let mut rig = rig();
    assert_eq!(rig.driver.features() & (1 << feature::DAQ_F_TRIGGER), 0);
    let mut wait = FakeWait::new(&rig.device);
    for op in [control::Opcode::Trigger, control::Opcode::SetTrigger] {
        let payload = vec![0; command_payload_size(op.code()).expect("known")];
        assert!(matches!(
            rig.driver.command(op, &payload, &mut wait),
            Err(DriverError::FeatureNotNegotiated(feature::DAQ_F_TRIGGER))
        ));
    }
    rig.device
        .with_state(|s| assert_eq!(s.notifications[usize::from(queue::CONTROL)], 0));
}

/// spec: [6.2-10] [6.6-5] before CONFIGURE, the driver takes back what the device holds.
#[test]
fn configure_with_another_frame_size_flushes_the_reads_in_flight_first() {
    let mut rig = rig();
    let id = rig.submit(HEADER_SIZE + 4 * FRAME);
    let settings = Configure {
        rate_hz: 1000.into(),
        latency_us: 100.into(),
        watermark_frames: 8.into(),
        channels: 3.into(),
        coalesce_buffers: 1.into(),
        format: SampleFormat::S16 as u8,
        ..Default::default()
    };
    let mut wait = FakeWait::new(&rig.device)
        .then(|device| {
            let command = device.take_command();
            assert_eq!(command.opcode(), opcode::GET_STATUS);
            let status = Status {
                frames_pending: 2.into(),
                ..Default::default()
            };
            device.reply(&command, status::OK, status.as_bytes());
        })
        .then(|device| {
            let command = device.take_command();
            assert_eq!(command.opcode(), opcode::FLUSH, "frames pending: FLUSH");
            let chain = device.take_read();
            let flushed = BufferHeader {
                flags: flags::FLUSHED.into(),
                ..header(0, 2)
            };
            let used = device.fill_read(&chain, &flushed, &payload(1, 2 * FRAME));
            device.complete(&chain, used as u32);
            let reply = FlushReply {
                buffers_returned: 1.into(),
                ..Default::default()
            };
            device.reply(&command, status::OK, reply.as_bytes());
        })
        .then(move |device| {
            let command = device.take_command();
            assert_eq!(command.opcode(), opcode::CONFIGURE);
            device.set_config(|c| {
                c.channels = 3.into();
                c.format = SampleFormat::S16 as u8;
            });
            device.reply(&command, status::OK, &[]);
        });
    rig.driver
        .configure(&settings, &mut wait)
        .expect("CONFIGURE");
    assert_eq!(wait.steps_left(), 0);
    let done = rig.driver.next_completion().expect("the read came back");
    assert_eq!(done.id, id);
    assert!(matches!(done.outcome, ReadOutcome::Data(h) if h.frame_count.get() == 2));
    assert_eq!(rig.driver.in_flight(), 0);
    assert_eq!(rig.driver.frame_bytes(), 3 * 2);
}

#[test]
fn start_stop_and_raw_commands_return_the_device_status() {
    let mut rig = rig();
    let mut wait = FakeWait::new(&rig.device)
        .answer(opcode::START, status::OK, &[])
        .answer(opcode::STOP, status::OK, &[])
        .answer(99, status::UNSUPPORTED, &[])
        .answer(opcode::RESET_COUNTERS, status::BUSY, &[]);
    rig.driver.start(&mut wait).expect("START");
    rig.driver.stop(&mut wait).expect("STOP");
    let (code, payload) = rig.driver.command_raw(99, &[], &mut wait).expect("raw");
    assert_eq!((code, payload.len()), (status::UNSUPPORTED, 0));
    let (code, _) = rig
        .driver
        .command_raw(opcode::RESET_COUNTERS, &[], &mut wait)
        .expect("raw");
    assert_eq!(code, status::BUSY);
    assert_eq!(wait.steps_left(), 0);
}

#[test]
fn command_answered_with_a_bad_status_is_a_command_error() {
    for (op, code) in [
        (opcode::START, status::BUSY),
        (opcode::STOP, status::BAD_SIZE),
        (opcode::GET_STATUS, status::INVALID),
        (opcode::FLUSH, status::UNSUPPORTED),
    ] {
        let mut rig = rig();
        let mut wait = FakeWait::new(&rig.device).answer(op, code, &[]);
        let result = match op {
            opcode::START => rig.driver.start(&mut wait),
            opcode::STOP => rig.driver.stop(&mut wait),
            opcode::GET_STATUS => rig.driver.status(&mut wait).map(drop),
            _ => rig.driver.flush(&mut wait).map(drop),
        };
        match result {
            Err(DriverError::Command { opcode, status }) => {
                assert_eq!((opcode.code(), status), (op, code));
            }
            other => panic!("opcode {op}: expected a Command error, got {other:?}"),
        }
    }
}

#[test]
fn reply_shorter_than_its_header_is_a_bad_reply() {
    for used in [0, 1, 4, 7] {
        let mut rig = rig();
        let mut wait = FakeWait::new(&rig.device).then(move |device| {
            let command = device.take_command();
            // A good header in memory, but the used length says it was not all written.
            let ok = ResponseHeader::default();
            device.reply_raw(&command, ok.as_bytes(), used);
        });
        let result = rig.driver.start(&mut wait);
        assert!(
            matches!(result, Err(DriverError::BadReply(opcode::START))),
            "used {used}: {result:?}"
        );
        assert!(
            !rig.driver.needs_reset(),
            "a bad reply is not a corrupt ring"
        );
    }
}

#[test]
fn reply_longer_than_the_reply_area_is_a_bad_reply() {
    for used in [REPLY_AREA as u32 + 1, 4096, u32::MAX] {
        let mut rig = rig();
        let mut wait = FakeWait::new(&rig.device).then(move |device| {
            let command = device.take_command();
            let flush = FlushReply {
                buffers_returned: 0.into(),
                reserved: 0.into(),
            };
            let mut bytes = ResponseHeader::default().as_bytes().to_vec();
            bytes.extend_from_slice(flush.as_bytes());
            device.reply_raw(&command, &bytes, used);
        });
        let result = rig.driver.flush(&mut wait);
        assert!(
            matches!(result, Err(DriverError::BadReply(opcode::FLUSH))),
            "used {used}: {result:?}"
        );
    }
}

#[test]
fn ok_reply_without_its_payload_is_a_bad_reply() {
    // GET_STATUS needs 72 bytes of payload, FLUSH 8.
    for (op, payload_len) in [
        (opcode::GET_STATUS, 0),
        (opcode::GET_STATUS, 40),
        (opcode::GET_STATUS, size_of::<Status>() - 1),
        (opcode::FLUSH, 0),
        (opcode::FLUSH, 4),
    ] {
        let mut rig = rig();
        let payload = vec![0xee; payload_len];
        let mut wait = FakeWait::new(&rig.device).answer(op, status::OK, &payload);
        let result = if op == opcode::FLUSH {
            rig.driver.flush(&mut wait).map(drop)
        } else {
            rig.driver.status(&mut wait).map(drop)
        };
        assert!(
            matches!(result, Err(DriverError::BadReply(got)) if got == op),
            "opcode {op} with {payload_len} payload bytes: {result:?}"
        );
    }
}

#[test]
fn ok_reply_with_a_longer_payload_is_read_up_to_its_structure() {
    let mut rig = rig();
    let answer = Status {
        frames_delivered: 99.into(),
        ..Default::default()
    };
    let mut long = answer.as_bytes().to_vec();
    long.extend_from_slice(&[0xab; 16]);
    let mut wait = FakeWait::new(&rig.device).answer(opcode::GET_STATUS, status::OK, &long);
    assert_eq!(rig.driver.status(&mut wait).expect("status"), answer);
}

/// spec: [6.8-10] the wait for a reply is bounded: a silent device is a timeout.
/// spec: [6.8-12] and the device is reset.
#[test]
fn timeout_leaves_the_command_pending_until_the_device_answers() {
    let mut rig = rig();
    let mut silent = FakeWait::new(&rig.device);
    assert!(matches!(
        rig.driver.start(&mut silent),
        Err(DriverError::Timeout)
    ));
    assert_eq!(silent.waits, 1);
    // The device has the command; the driver will not send another meanwhile.
    let late = rig.device.take_command();
    assert_eq!(late.opcode(), opcode::START);
    assert!(matches!(
        rig.driver.stop(&mut FakeWait::new(&rig.device)),
        Err(DriverError::QueueFull)
    ));
    assert_eq!(
        rig.device.avail_pending(queue::CONTROL),
        0,
        "nothing new sent"
    );
    // A command never answered in time is a violation the driver recovers from by a reset
    // (spec [6.8-11]); a reply arriving later meanwhile is taken and dropped.
    assert_eq!(rig.driver.violation(), Some(Violation::ReplyMissing));
    assert!(rig.driver.needs_reset());
    rig.device.reply(&late, status::OK, &[]);
    rig.driver.service();
    let mut wait = FakeWait::new(&rig.device);
    rig.driver.recover(&mut wait).expect("recover");
    let mut wait = FakeWait::new(&rig.device).answer(opcode::STOP, status::OK, &[]);
    rig.driver.stop(&mut wait).expect("STOP after the reset");
}

#[test]
fn reply_on_a_descriptor_that_is_not_the_commands_head_marks_the_ring_corrupt() {
    let mut rig = rig();
    let mut wait = FakeWait::new(&rig.device).then(|device| {
        let command = device.take_command();
        assert_eq!(command.chain.descriptors.len(), 2);
        // The reply descriptor's index, not the chain's head.
        let second = command.chain.descriptors[0].next.get();
        command.chain.write(0, ResponseHeader::default().as_bytes());
        device.put_used(queue::CONTROL, u32::from(second), 8);
        device.interrupt(CAUSE_USED_BUFFER);
    });
    let result = rig.driver.start(&mut wait);
    assert!(result.is_err(), "an answer on the wrong id is not a reply");
    assert!(rig.driver.needs_reset(), "the control ring is corrupt");
    assert!(matches!(
        rig.driver.submit_read(Buffer::new(READ_LEN)),
        Err((DriverError::NeedsReset, _))
    ));
}

#[test]
fn command_gives_up_at_once_when_its_ring_is_corrupt() {
    let mut rig = rig();
    let mut wait = FakeWait::new(&rig.device)
        .then(|device| {
            let command = device.take_command();
            device.put_used(queue::CONTROL, u32::from(command.chain.head) + 1, 8);
            device.interrupt(CAUSE_USED_BUFFER);
        })
        // A real Wait would sleep until its deadline here.
        .then(|_| {})
        .then(|_| {});
    let result = rig.driver.start(&mut wait);
    assert!(
        matches!(result, Err(DriverError::NeedsReset)),
        "got {result:?}"
    );
    assert_eq!(wait.waits, 1, "no waiting once the ring is known corrupt");
}

#[test]
fn unsolicited_control_completion_marks_the_ring_corrupt() {
    let mut rig = rig();
    rig.device.put_used(queue::CONTROL, 0, 8);
    rig.device.interrupt(CAUSE_USED_BUFFER);
    assert_eq!(rig.driver.service(), 0);
    assert!(rig.driver.needs_reset());
    assert!(!rig.device.line().is_masked(), "unmasked even so");
}

// ---------------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------------

/// spec: [6.2-6] dataq chains are device-writable descriptors only, at most 64 (here 1).
#[test]
fn read_buffer_is_one_device_writable_descriptor_of_its_length() {
    let mut rig = rig();
    rig.submit(READ_LEN);
    let chain = rig.device.take_read();
    assert_eq!(chain.descriptors.len(), 1);
    assert_ne!(chain.descriptors[0].flags.get() & DESC_F_WRITE, 0);
    assert_eq!(chain.writable_len(), READ_LEN);
    assert_eq!(chain.readable_len(), 0);
    assert_eq!(chain.read_writable(), vec![0; READ_LEN], "a zeroed buffer");
    rig.device
        .with_state(|s| assert_eq!(s.notifications[usize::from(queue::DATA)], 1));
    assert_eq!(rig.driver.stats().data_notifications, 1);
}

#[test]
fn read_completes_with_a_valid_header() {
    let mut rig = rig();
    let unmasks = rig.device.line().unmasks();
    let written = header(0, FRAMES);
    let (_, done) = rig.read_answered(&written, READ_LEN as u32);
    assert_eq!(done.outcome, ReadOutcome::Data(written));
    assert_eq!(&done.buffer.as_slice()[..HEADER_SIZE], written.as_bytes());
    assert_eq!(
        &done.buffer.as_slice()[HEADER_SIZE..],
        payload(0x5a, READ_LEN - HEADER_SIZE).as_slice()
    );
    assert_eq!(rig.driver.in_flight(), 0);
    let stats = rig.driver.stats();
    assert_eq!((stats.completed, stats.bottom_halves), (1, 1));
    assert_eq!((stats.rejected, stats.invalid, stats.cancelled), (0, 0, 0));
    assert!(!rig.device.line().is_masked());
    assert!(
        rig.device.line().unmasks() > unmasks,
        "the bottom half unmasks"
    );
    assert!(!rig.driver.completions_waiting());
}

#[test]
fn partly_filled_read_is_data_with_its_own_length() {
    let mut rig = rig();
    let mut short = header(0, 3);
    short.flags = flags::LATENCY.into();
    let (_, done) = rig.read_answered(&short, used_len(&short));
    assert_eq!(done.used_len, HEADER_SIZE + 3 * FRAME);
    assert_eq!(done.outcome, ReadOutcome::Data(short));
    // An empty FLUSHED buffer: a header and nothing else.
    let mut empty = header(1, 0);
    empty.flags = flags::FLUSHED.into();
    assert_eq!(
        rig.outcome(&empty, HEADER_SIZE as u32),
        ReadOutcome::Data(empty)
    );
}

/// spec: [7-3] used length 0 is "nothing returned": a valid header in the buffer is not read.
#[test]
fn used_length_zero_is_rejected_whatever_the_buffer_holds() {
    let mut rig = rig();
    assert_eq!(rig.outcome(&header(0, FRAMES), 0), ReadOutcome::Rejected);
    assert_eq!(rig.driver.stats().rejected, 1);
    assert_eq!(rig.driver.stats().completed, 0);
}

/// spec: [6.3-5] a BAD_BUFFER header's `sequence` and `first_frame` mean nothing.
#[test]
fn bad_buffer_header_is_rejected() {
    let mut rig = rig();
    let bad = BufferHeader {
        status: buffer_status::BAD_BUFFER,
        format: FORMAT as u8,
        channels: CHANNELS.into(),
        ..Default::default()
    };
    assert_eq!(rig.outcome(&bad, HEADER_SIZE as u32), ReadOutcome::Rejected);
    // Whatever its other fields say, even a frame count that matches the used length.
    let lying = BufferHeader {
        sequence: 77.into(),
        first_frame: 123_456.into(),
        frame_count: (FRAMES as u32).into(),
        ..bad
    };
    assert_eq!(rig.outcome(&lying, READ_LEN as u32), ReadOutcome::Rejected);
    assert_eq!(rig.driver.stats().rejected, 2);
    assert_eq!(rig.driver.stats().completed, 0);
}

#[test]
fn used_length_shorter_than_a_header_is_invalid() {
    for used in [1, 8, HEADER_SIZE as u32 - 1] {
        let mut rig = rig();
        assert_eq!(
            rig.outcome(&header(0, 0), used),
            ReadOutcome::Invalid {
                used: used as usize
            }
        );
        assert_eq!(rig.driver.stats().invalid, 1);
    }
}

#[test]
fn used_length_beyond_the_buffer_is_invalid_even_with_a_matching_header() {
    let mut rig = rig();
    // The header claims one frame more than fits, and the used length agrees with it.
    let over = header(0, FRAMES + 1);
    assert_eq!(used_len(&over), READ_LEN as u32 + FRAME as u32);
    assert_eq!(
        rig.outcome(&over, used_len(&over)),
        ReadOutcome::Invalid {
            used: READ_LEN + FRAME
        }
    );
    for used in [READ_LEN as u32 + 1, u32::MAX] {
        assert_eq!(
            rig.outcome(&header(0, FRAMES), used),
            ReadOutcome::Invalid {
                used: used as usize
            }
        );
    }
    assert_eq!(rig.driver.stats().invalid, 3);
}

#[test]
fn header_frame_count_that_disagrees_with_the_used_length_is_invalid() {
    let mut rig = rig();
    for frames in [0, 1, FRAMES - 1, FRAMES + 1, u32::MAX as usize] {
        let lying = header(0, frames);
        assert_eq!(
            rig.outcome(&lying, READ_LEN as u32),
            ReadOutcome::Invalid { used: READ_LEN },
            "frame_count {frames}"
        );
    }
}

#[test]
fn header_with_an_unknown_format_or_status_is_invalid() {
    let mut rig = rig();
    for format in [0, 4, 0xff] {
        let lying = BufferHeader {
            format,
            ..header(0, FRAMES)
        };
        assert_eq!(
            rig.outcome(&lying, READ_LEN as u32),
            ReadOutcome::Invalid { used: READ_LEN },
            "format {format}"
        );
    }
    for code in [2, 0x80, 0xff] {
        let lying = BufferHeader {
            status: code,
            ..header(0, FRAMES)
        };
        assert_eq!(
            rig.outcome(&lying, READ_LEN as u32),
            ReadOutcome::Invalid { used: READ_LEN },
            "status {code}"
        );
    }
}

#[test]
fn header_whose_channels_disagree_with_its_frame_count_is_invalid() {
    let mut rig = rig();
    for channels in [1, 3, 4, u16::MAX] {
        let lying = BufferHeader {
            channels: channels.into(),
            ..header(0, FRAMES)
        };
        assert_eq!(
            rig.outcome(&lying, READ_LEN as u32),
            ReadOutcome::Invalid { used: READ_LEN },
            "channels {channels}"
        );
    }
}

#[test]
fn header_with_zero_channels_and_frames_is_invalid() {
    let mut rig = rig();
    let lying = BufferHeader {
        channels: 0.into(),
        ..header(0, FRAMES)
    };
    assert_eq!(
        rig.outcome(&lying, HEADER_SIZE as u32),
        ReadOutcome::Invalid { used: HEADER_SIZE }
    );
}

#[test]
fn header_in_another_format_than_the_stream_is_invalid() {
    let mut rig = rig();
    // s16 × 4 channels is 8 bytes a frame too: the used length matches.
    let other = BufferHeader {
        format: SampleFormat::S16 as u8,
        channels: 4.into(),
        ..header(0, FRAMES)
    };
    assert_eq!(used_len(&other), READ_LEN as u32);
    assert_eq!(
        rig.outcome(&other, READ_LEN as u32),
        ReadOutcome::Invalid { used: READ_LEN }
    );
}

/// spec: [7-5] a read completed out of order is kept until the reset.
#[test]
fn a_read_with_data_completed_before_an_older_one_is_a_violation_and_the_ring_is_not_trusted() {
    let mut rig = rig();
    let ids: Vec<RequestId> = (0..3).map(|_| rig.submit(READ_LEN)).collect();
    let chains: Vec<_> = (0..3).map(|_| rig.device.take_read()).collect();
    // The oldest read is returned rejected (its chain refused when posted: spec 5.x.6.2,
    // it was never accepted) and may come back first; then the newest with data, before the
    // middle one.
    rig.device.complete(&chains[0], 0);
    let h = header(0, FRAMES);
    rig.device
        .fill_read(&chains[2], &h, &payload(2, READ_LEN - HEADER_SIZE));
    rig.device.complete(&chains[2], READ_LEN as u32);
    rig.device.interrupt(CAUSE_USED_BUFFER);
    rig.driver.service();
    let first = rig.driver.next_completion().expect("rejected");
    assert_eq!((first.id, first.outcome), (ids[0], ReadOutcome::Rejected));
    // The out-of-order buffer is not handed back: the device may still be writing into it
    // (a stale entry). It comes back only after the reset, as reclaimed.
    assert!(rig.driver.next_completion().is_none());
    assert_eq!(rig.driver.violation(), Some(Violation::CompletionOrder));
    assert!(rig.driver.needs_reset(), "the ring is not trusted any more");
    let report = rig
        .driver
        .recover(&mut FakeWait::new(&rig.device))
        .expect("recover");
    assert_eq!((report.returned, report.reclaimed), (0, 2));
    let mut back: Vec<_> = core::iter::from_fn(|| rig.driver.next_completion())
        .map(|done| (done.id, done.outcome))
        .collect();
    back.sort_by_key(|(id, _)| *id);
    assert_eq!(
        back,
        vec![
            (ids[1], ReadOutcome::Reclaimed),
            (ids[2], ReadOutcome::Reclaimed)
        ]
    );
}

/// spec: [7-6] a used index far ahead: stale entries are neither data nor harvested forever.
#[test]
fn stale_used_entries_after_a_used_index_jump_are_not_taken_as_data() {
    let mut rig = rig();
    // Two reads complete in order and are reposted; the device then moves the used index on
    // by the queue size: the driver meets the old entries again.
    let _ = rig.read_answered(&header(0, FRAMES), READ_LEN as u32);
    let ids: Vec<RequestId> = (0..2).map(|_| rig.submit(READ_LEN)).collect();
    let _chains: Vec<_> = (0..2).map(|_| rig.device.take_read()).collect();
    rig.device
        .jump_used_index(queue::DATA, DATA_QUEUE_SIZE as u16);
    rig.device.interrupt(CAUSE_USED_BUFFER);
    rig.driver.service();
    let taken: Vec<_> = core::iter::from_fn(|| rig.driver.next_completion()).collect();
    // A never-written slot reads as id 0, length 0: when it names the oldest read it cannot
    // be told from the device returning that read unwritten (spec 5.x.7), so it comes back
    // Rejected, contents unread. Nothing else comes back before the reset, and no data.
    assert!(
        taken.len() <= 1
            && taken
                .iter()
                .all(|done| done.outcome == ReadOutcome::Rejected),
        "no stale entry is taken as data: {:?}",
        taken.iter().map(|d| d.outcome).collect::<Vec<_>>()
    );
    assert!(rig.driver.violation().is_some());
    assert!(rig.driver.needs_reset());
    let report = rig
        .driver
        .recover(&mut FakeWait::new(&rig.device))
        .expect("recover");
    assert_eq!(report.returned + report.reclaimed + taken.len(), ids.len());
}

#[test]
fn unknown_used_id_marks_the_ring_corrupt_and_refuses_new_reads() {
    for bogus in [5u32, 255, 256, 300, 0xffff] {
        let mut rig = rig();
        rig.submit(READ_LEN);
        let chain = rig.device.take_read();
        assert_eq!(chain.head, 0);
        rig.device.put_used(queue::DATA, bogus, READ_LEN as u32);
        rig.device.interrupt(CAUSE_USED_BUFFER);
        assert_eq!(rig.driver.service(), 0, "id {bogus}");
        assert!(rig.driver.next_completion().is_none());
        assert!(rig.driver.needs_reset());
        assert_eq!(
            rig.driver.in_flight(),
            1,
            "the real read is still the device's"
        );
        assert!(
            rig.driver.completions_waiting(),
            "the entry stays on the ring"
        );
        let (err, buffer) = rig
            .driver
            .submit_read(Buffer::new(READ_LEN))
            .expect_err("refused");
        assert!(matches!(err, DriverError::NeedsReset));
        assert_eq!(buffer.len(), READ_LEN, "the buffer comes back");
        // Servicing again does not spin or panic.
        rig.device.interrupt(CAUSE_USED_BUFFER);
        assert_eq!(rig.driver.service(), 0);
    }
}

#[test]
#[ignore = "bug (virtio-drivers 0.13): peek_used/pop_used truncate the used ring's 32-bit id to \
            u16, so an id of 65536 + token completes that token's read"]
fn used_id_aliasing_a_token_modulo_2_16_is_not_taken() {
    let mut rig = rig();
    rig.submit(READ_LEN);
    let chain = rig.device.take_read();
    rig.device.fill_read(&chain, &header(0, FRAMES), &[]);
    rig.device.put_used(
        queue::DATA,
        0x1_0000 + u32::from(chain.head),
        READ_LEN as u32,
    );
    rig.device.interrupt(CAUSE_USED_BUFFER);
    rig.driver.service();
    assert!(rig.driver.next_completion().is_none(), "id 65536 is not 0");
    assert!(rig.driver.needs_reset());
}

#[test]
fn used_id_returned_twice_marks_the_ring_corrupt() {
    let mut rig = rig();
    let (_, done) = rig.read_answered(&header(0, FRAMES), READ_LEN as u32);
    assert!(matches!(done.outcome, ReadOutcome::Data(_)));
    drop(done);
    rig.device.put_used(queue::DATA, 0, READ_LEN as u32);
    rig.device.interrupt(CAUSE_USED_BUFFER);
    assert_eq!(rig.driver.service(), 0);
    assert!(rig.driver.next_completion().is_none());
    assert!(rig.driver.needs_reset());
}

#[test]
fn cancelled_read_comes_back_cancelled_whatever_the_device_wrote() {
    let mut rig = rig();
    let id = rig.submit(READ_LEN);
    assert!(rig.driver.cancel(id));
    assert!(!rig.driver.cancel(RequestId(999)));
    let chain = rig.device.take_read();
    rig.device.fill_read(&chain, &header(0, FRAMES), &[]);
    rig.device.complete(&chain, READ_LEN as u32);
    rig.device.interrupt(CAUSE_USED_BUFFER);
    rig.driver.service();
    let done = rig.driver.next_completion().expect("completion");
    assert_eq!((done.id, done.outcome), (id, ReadOutcome::Cancelled));
    assert_eq!(rig.driver.stats().cancelled, 1);
    assert_eq!(rig.driver.stats().completed, 0);
    assert!(!rig.driver.cancel(id), "no longer in flight");
}

/// spec: [6.2-7] every read buffer holds the 64-byte header and one frame.
#[test]
fn read_buffer_too_small_for_a_frame_is_refused_and_given_back() {
    let mut rig = rig();
    for len in [0, 1, HEADER_SIZE, HEADER_SIZE + FRAME - 1] {
        let (err, buffer) = rig
            .driver
            .submit_read(Buffer::new(len))
            .expect_err("too small");
        assert!(
            matches!(err, DriverError::BufferTooSmall { len: l, needed } if l == len && needed == HEADER_SIZE + FRAME),
            "{err:?}"
        );
        assert_eq!(buffer.len(), len);
    }
    assert_eq!(rig.device.avail_pending(queue::DATA), 0);
    assert_eq!(rig.driver.in_flight(), 0);
    rig.submit(HEADER_SIZE + FRAME);
}

#[test]
fn full_data_queue_gives_the_buffer_back() {
    let mut rig = rig();
    for _ in 0..DATA_QUEUE_SIZE {
        rig.driver
            .submit_read_batched(Buffer::new(HEADER_SIZE + FRAME))
            .map_err(|(err, _)| err)
            .expect("submit");
    }
    rig.driver.kick();
    let (err, buffer) = rig
        .driver
        .submit_read(Buffer::new(READ_LEN))
        .expect_err("full");
    assert!(matches!(err, DriverError::QueueFull));
    assert_eq!(buffer.len(), READ_LEN);
    assert_eq!(rig.driver.in_flight(), DATA_QUEUE_SIZE);
    assert_eq!(
        rig.device.avail_pending(queue::DATA),
        DATA_QUEUE_SIZE as u16
    );
    assert_eq!(rig.driver.stats().data_notifications, 1, "one kick");
}

#[test]
fn completion_without_an_interrupt_waits_for_the_watchdog() {
    let mut rig = rig();
    rig.submit(READ_LEN);
    let chain = rig.device.take_read();
    rig.device.fill_read(&chain, &header(0, FRAMES), &[]);
    rig.device.complete(&chain, READ_LEN as u32);
    // The interrupt is lost.
    assert_eq!(rig.driver.service(), 0);
    assert!(rig.driver.next_completion().is_none());
    assert!(rig.driver.completions_waiting());
    rig.device.irq().raise();
    assert_eq!(rig.driver.service(), 1);
    assert!(!rig.driver.completions_waiting());
}

/// spec: [6.7-3] after unmasking, the bottom half checks the used rings again.
#[test]
fn completion_arriving_at_unmask_is_found_by_the_recheck() {
    let mut rig = rig();
    rig.submit(READ_LEN);
    rig.submit(READ_LEN);
    let first = rig.device.take_read();
    let second = rig.device.take_read();
    rig.device.fill_read(&first, &header(0, FRAMES), &[]);
    rig.device.fill_read(&second, &header(1, FRAMES), &[]);
    rig.device.complete(&first, READ_LEN as u32);
    rig.device.interrupt(CAUSE_USED_BUFFER);
    let device = rig.device.clone();
    // The second completes in the window between the drain and the unmask.
    rig.device
        .on_next_unmask(move || device.complete(&second, READ_LEN as u32));
    assert_eq!(rig.driver.service(), 2);
    assert_eq!(rig.driver.stats().found_on_recheck, 1);
    assert_eq!(rig.driver.stats().bottom_halves, 1);
}

// ---------------------------------------------------------------------------------------------
// Events and device state
// ---------------------------------------------------------------------------------------------

fn event(kind: u32, arg0: u64) -> Event {
    Event {
        kind: kind.into(),
        timestamp_ns: 5.into(),
        arg0: arg0.into(),
        ..Default::default()
    }
}

/// spec: [6.9-4] each event buffer is reposted once its event is taken.
#[test]
fn events_are_received_and_their_buffers_reposted() {
    let mut rig = rig();
    let overrun = event(kind::OVERRUN, 42);
    rig.device.send_event(&overrun, EVENT_SIZE as u32);
    rig.driver.service();
    assert_eq!(rig.driver.next_event(), Some(overrun));
    assert_eq!(rig.driver.stats().events, 1);
    assert!(!rig.driver.needs_reset(), "an overrun is not a fault");
    assert_eq!(rig.device.avail_pending(queue::EVENT), EVENT_BUFFERS);
}

/// spec: [6.13-7] a NEEDS_RESET event counts as the notification of NEEDS_RESET.
#[test]
fn needs_reset_event_refuses_new_reads() {
    let mut rig = rig();
    rig.device
        .send_event(&event(kind::NEEDS_RESET, 1), EVENT_SIZE as u32);
    rig.driver.service();
    assert_eq!(
        rig.driver.next_event().map(|e| e.kind.get()),
        Some(kind::NEEDS_RESET)
    );
    assert!(rig.driver.needs_reset());
    assert!(matches!(
        rig.driver.submit_read(Buffer::new(READ_LEN)),
        Err((DriverError::NeedsReset, _))
    ));
}

/// spec: [7-3] an event buffer returned with used length 0 (or short) is not read.
#[test]
fn short_or_empty_event_is_dropped_and_its_buffer_reposted() {
    let mut rig = rig();
    for used in [0, 1, EVENT_SIZE as u32 - 1] {
        rig.device.send_event(&event(kind::NEEDS_RESET, 1), used);
        rig.driver.service();
        assert_eq!(rig.driver.next_event(), None, "used {used}");
    }
    assert_eq!(rig.driver.stats().events, 0);
    assert!(!rig.driver.needs_reset(), "an unwritten event is not read");
    assert_eq!(rig.device.avail_pending(queue::EVENT), EVENT_BUFFERS);
}

#[test]
fn unknown_event_id_marks_the_ring_corrupt() {
    let mut rig = rig();
    // Descriptors 8..16 of the event queue hold no buffer.
    rig.device.put_used(queue::EVENT, 12, EVENT_SIZE as u32);
    rig.device.interrupt(CAUSE_USED_BUFFER);
    rig.driver.service();
    assert_eq!(rig.driver.next_event(), None);
    assert!(rig.driver.needs_reset());
}

/// spec: [6.13-5] every configuration-change notification makes the driver read `state`.
#[test]
fn configuration_change_to_needs_reset_is_noticed() {
    let mut rig = rig();
    let reads = || rig.device.with_state(|s| s.config_reads);
    // A notification for another change: `state` is read, and is fine.
    rig.device.set_config(|c| c.latency_us = 5_000.into());
    let before = reads();
    rig.device.interrupt(fake::CAUSE_CONFIG_CHANGE);
    rig.driver.service();
    assert!(reads() > before, "the config space was read");
    assert!(!rig.driver.needs_reset());
    assert_eq!(rig.driver.stats().config_changes, 1);
    rig.device
        .set_config(|c| c.state = DaqState::NeedsReset as u8);
    // A used-buffer interrupt alone does not make the driver read the state.
    let before = reads();
    rig.device.interrupt(CAUSE_USED_BUFFER);
    rig.driver.service();
    assert_eq!(reads(), before);
    assert!(!rig.driver.needs_reset());
    rig.device.interrupt(fake::CAUSE_CONFIG_CHANGE);
    rig.driver.service();
    assert!(reads() > before);
    assert!(rig.driver.needs_reset());
    assert_eq!(rig.driver.stats().config_changes, 2);
}

// ---------------------------------------------------------------------------------------------
// Recovery and shutdown
// ---------------------------------------------------------------------------------------------

#[test]
fn recover_returns_what_the_device_gave_back_and_reclaims_the_rest() {
    let mut rig = rig();
    let ids: Vec<RequestId> = (0..3).map(|_| rig.submit(READ_LEN)).collect();
    let chains: Vec<_> = (0..3).map(|_| rig.device.take_read()).collect();
    rig.device
        .send_event(&event(kind::NEEDS_RESET, 1), EVENT_SIZE as u32);
    rig.driver.service();
    assert!(rig.driver.needs_reset());
    let old_data_ring = rig.device.queue(queue::DATA).descriptors;
    // At the reset the device hands back the first read, flushed and empty.
    let device = rig.device.clone();
    let first = chains[0].clone();
    rig.device.on_reset(move || {
        let mut empty = header(0, 0);
        empty.flags = flags::FLUSHED.into();
        device.fill_read(&first, &empty, &[]);
        device.complete(&first, HEADER_SIZE as u32);
    });
    let counters = Status {
        buffers_held: 3.into(),
        state: DaqState::NeedsReset as u8,
        ..Default::default()
    };
    let mut wait =
        FakeWait::new(&rig.device).answer(opcode::GET_STATUS, status::OK, counters.as_bytes());
    let report = rig.driver.recover(&mut wait).expect("recover");
    assert_eq!(report.status, Some(counters));
    assert_eq!((report.returned, report.reclaimed), (1, 2));
    let done: Vec<_> = core::iter::from_fn(|| rig.driver.next_completion()).collect();
    assert_eq!(done.len(), 3);
    assert_eq!(done[0].id, ids[0]);
    assert!(matches!(done[0].outcome, ReadOutcome::Data(h) if h.flags.get() == flags::FLUSHED));
    for (done, id) in done[1..].iter().zip(&ids[1..]) {
        assert_eq!(
            (done.id, done.outcome, done.used_len),
            (*id, ReadOutcome::Reclaimed, 0)
        );
    }
    // Initialised again: fresh queues, event buffers, and reads work.
    assert!(!rig.driver.needs_reset());
    assert_eq!(rig.driver.in_flight(), 0);
    assert_eq!(rig.device.status(), init_status());
    assert_ne!(rig.device.queue(queue::DATA).descriptors, old_data_ring);
    assert_eq!(rig.device.avail_pending(queue::EVENT), EVENT_BUFFERS);
    let (_, done) = rig.read_answered(&header(0, FRAMES), READ_LEN as u32);
    assert!(matches!(done.outcome, ReadOutcome::Data(_)));
}

#[test]
fn recover_after_a_corrupt_ring_skips_the_status_and_reclaims_everything() {
    let mut rig = rig();
    let id = rig.submit(READ_LEN);
    rig.device.take_read();
    rig.device.put_used(queue::DATA, 77, READ_LEN as u32);
    rig.device.interrupt(CAUSE_USED_BUFFER);
    rig.driver.service();
    assert!(rig.driver.needs_reset());
    let mut silent = FakeWait::new(&rig.device);
    let report = rig.driver.recover(&mut silent).expect("recover");
    assert_eq!(silent.waits, 0, "no command on a corrupt device");
    assert_eq!(report.status, None);
    assert_eq!((report.returned, report.reclaimed), (0, 1));
    let done = rig.driver.next_completion().expect("reclaimed");
    assert_eq!((done.id, done.outcome), (id, ReadOutcome::Reclaimed));
    assert!(!rig.driver.needs_reset());
    rig.submit(READ_LEN);
}

fn flushed(sequence: u64) -> BufferHeader {
    let mut h = header(sequence, 0);
    h.flags = flags::FLUSHED.into();
    h
}

/// A FLUSH step: return `chains` as empty FLUSHED buffers, then reply `returned`.
fn flush_step(chains: Vec<fake::Chain>, returned: u32) -> impl FnMut(&FakeDevice) {
    move |device| {
        let command = device.take_command();
        assert_eq!(command.opcode(), opcode::FLUSH);
        for (i, chain) in chains.iter().enumerate() {
            device.fill_read(chain, &flushed(i as u64), &[]);
            device.complete(chain, HEADER_SIZE as u32);
        }
        let reply = FlushReply {
            buffers_returned: returned.into(),
            reserved: 0.into(),
        };
        device.reply(&command, status::OK, reply.as_bytes());
    }
}

#[test]
fn flush_collects_the_reads_the_device_returned_before_its_reply() {
    let mut rig = rig();
    let ids: Vec<RequestId> = (0..2).map(|_| rig.submit(READ_LEN)).collect();
    let chains = vec![rig.device.take_read(), rig.device.take_read()];
    let mut wait = FakeWait::new(&rig.device).then(flush_step(chains, 2));
    assert_eq!(rig.driver.flush(&mut wait).expect("FLUSH"), 2);
    for (i, id) in ids.iter().enumerate() {
        let done = rig.driver.next_completion().expect("completion");
        assert_eq!(done.id, *id);
        assert_eq!(done.outcome, ReadOutcome::Data(flushed(i as u64)));
    }
    assert_eq!(rig.driver.in_flight(), 0);
}

#[test]
fn shutdown_drains_every_read_and_resets_the_device() {
    let mut rig = rig();
    for _ in 0..2 {
        rig.submit(READ_LEN);
    }
    let chains = vec![rig.device.take_read(), rig.device.take_read()];
    let held = Status::default();
    let mut wait = FakeWait::new(&rig.device)
        .answer(opcode::STOP, status::OK, &[])
        .then(flush_step(chains, 2))
        .answer(opcode::GET_STATUS, status::OK, held.as_bytes());
    let report = rig.driver.shutdown(&mut wait).expect("shutdown");
    assert_eq!(report.in_flight_at_start, 2);
    assert_eq!((report.returned, report.flush_returned), (2, 2));
    assert_eq!(report.device_held_after, 0);
    assert_eq!(rig.driver.in_flight(), 0);
    assert_eq!(rig.device.status(), DeviceStatus::empty(), "reset");
    assert!(matches!(
        rig.driver.submit_read(Buffer::new(READ_LEN)),
        Err((DriverError::ShuttingDown, _))
    ));
}

#[test]
fn shutdown_waits_for_reads_returned_after_the_flush_reply() {
    let mut rig = rig();
    for _ in 0..2 {
        rig.submit(READ_LEN);
    }
    let first = rig.device.take_read();
    let second = rig.device.take_read();
    let mut wait = FakeWait::new(&rig.device)
        .answer(opcode::STOP, status::OK, &[])
        .then(flush_step(vec![first], 1))
        .then(move |device| {
            device.fill_read(&second, &flushed(1), &[]);
            device.complete(&second, HEADER_SIZE as u32);
            device.interrupt(CAUSE_USED_BUFFER);
        })
        .answer(opcode::GET_STATUS, status::OK, Status::default().as_bytes());
    let report = rig.driver.shutdown(&mut wait).expect("shutdown");
    assert_eq!((report.returned, report.flush_returned), (2, 1));
    assert_eq!(rig.driver.in_flight(), 0);
}

#[test]
fn shutdown_times_out_when_the_device_keeps_a_read() {
    let mut rig = rig();
    for _ in 0..2 {
        rig.submit(READ_LEN);
    }
    let first = rig.device.take_read();
    let mut wait = FakeWait::new(&rig.device)
        .answer(opcode::STOP, status::OK, &[])
        .then(flush_step(vec![first], 1));
    assert!(matches!(
        rig.driver.shutdown(&mut wait),
        Err(DriverError::Timeout)
    ));
    // Nothing stays pending: the device was reset and the kept read taken back.
    assert_eq!(rig.driver.in_flight(), 0);
    assert_eq!(rig.device.status(), DeviceStatus::empty());
    let outcomes: Vec<_> = core::iter::from_fn(|| rig.driver.next_completion())
        .map(|done| done.outcome)
        .collect();
    assert_eq!(
        outcomes.last(),
        Some(&ReadOutcome::Reclaimed),
        "{outcomes:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Whatever the device answers
// ---------------------------------------------------------------------------------------------

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The outcome 5.x.6.2, 5.x.6.3 and 5.x.7 prescribe for a buffer of `len` bytes returned with
/// `used` (a payload is whole frames of the configured size).
fn expected_outcome(written: &BufferHeader, len: usize, used: usize) -> ReadOutcome {
    if used == 0 {
        return ReadOutcome::Rejected;
    }
    if !(HEADER_SIZE..=len).contains(&used) {
        return ReadOutcome::Invalid { used };
    }
    match written.status {
        buffer_status::BAD_BUFFER => ReadOutcome::Rejected,
        buffer_status::OK
            if written.payload_bytes() == Some(used - HEADER_SIZE)
                && (written.frame_count.get() == 0
                    || (written.format == FORMAT as u8 && written.channels.get() == CHANNELS)) =>
        {
            ReadOutcome::Data(*written)
        }
        _ => ReadOutcome::Invalid { used },
    }
}

/// spec: [6.2-9] every used element: length 0 → no data, else status, and for OK the used
/// length against frame_count × channels × sample size, in whole frames of the stream.
#[test]
fn any_used_length_and_header_is_judged_per_spec_without_panicking() {
    let mut rig = rig();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Buffers with data are numbered one by one (a gap is a violation of its own).
    let mut sequence = 0u64;
    for round in 0..2000 {
        let len = HEADER_SIZE + FRAME + rng.below(600) as usize;
        let formats = [0, 1, 2, 3, 9];
        let written = BufferHeader {
            sequence: sequence.into(),
            frame_count: (rng.below(80) as u32).into(),
            status: [
                buffer_status::OK,
                buffer_status::OK,
                buffer_status::BAD_BUFFER,
                5,
            ][rng.below(4) as usize],
            format: formats[rng.below(formats.len() as u64) as usize],
            channels: (rng.below(5) as u16).into(),
            ..Default::default()
        };
        let used = match rng.below(4) {
            0 => 0,
            1 => rng.below(len as u64 + 200) as u32,
            2 => written
                .payload_bytes()
                .map_or(HEADER_SIZE as u32, |p| (HEADER_SIZE + p) as u32),
            _ => rng.next() as u32,
        };
        let id = rig.submit(len);
        let chain = rig.device.take_read();
        rig.device.fill_read(&chain, &written, &[]);
        rig.device.complete(&chain, used);
        rig.device.interrupt(CAUSE_USED_BUFFER);
        rig.driver.service();
        let done = rig.driver.next_completion().expect("a completion");
        assert_eq!(done.id, id);
        assert_eq!(done.buffer.len(), len);
        let expected = expected_outcome(&written, len, used as usize);
        assert_eq!(
            done.outcome, expected,
            "round {round}: len {len}, used {used}, header {written:?}"
        );
        if matches!(expected, ReadOutcome::Data(_)) {
            sequence += 1;
        }
    }
    let stats = rig.driver.stats();
    assert_eq!(stats.completed + stats.rejected + stats.invalid, 2000);
    assert!(stats.completed > 0 && stats.rejected > 0 && stats.invalid > 0);
    assert!(!rig.driver.needs_reset());
}

// ---------------------------------------------------------------------------------------------
// What the spec asks of a driver, one requirement at a time
// ---------------------------------------------------------------------------------------------

/// Settings within the rig's limits.
fn valid_settings() -> Configure {
    Configure {
        rate_hz: 1000.into(),
        latency_us: 100.into(),
        watermark_frames: 8.into(),
        channels: CHANNELS.into(),
        coalesce_buffers: 1.into(),
        format: FORMAT as u8,
        ..Default::default()
    }
}

/// A step answering CONFIGURE as a device that applies the frame size (`channels`, `format`).
fn configure_step(settings: Configure) -> impl FnMut(&FakeDevice) {
    move |device| {
        let command = device.take_command();
        assert_eq!(command.opcode(), opcode::CONFIGURE);
        device.set_config(|c| {
            c.channels = settings.channels;
            c.format = settings.format;
        });
        device.reply(&command, status::OK, &[]);
    }
}

/// spec: [1-2] a newer minor firmware, header flags and event kinds the driver does not know.
#[test]
fn a_newer_minor_firmware_with_unknown_flags_and_event_kinds_is_driven_as_usual() {
    let mut config = fake::config(FORMAT, CHANNELS);
    config.firmware_version.set(vdaq_wire::FIRMWARE_VERSION + 7);
    let (device, transport) = FakeDevice::new(feature::DEVICE_FEATURES, &config);
    let driver = Driver::new(transport, device.irq(), DriverOptions::default());
    let mut rig = Rig {
        device,
        driver: driver.expect("a newer minor is not refused"),
    };
    assert_eq!(rig.device.status(), init_status());
    let unknown_flags: u16 = 0x8000 | 0x0200;
    assert_eq!(unknown_flags & flags::ALL, 0);
    let mut written = header(0, 3);
    written.flags = (flags::LATENCY | unknown_flags).into();
    assert_eq!(
        rig.outcome(&written, used_len(&written)),
        ReadOutcome::Data(written),
        "unknown flags are ignored"
    );
    let newer = event(0x20, 1);
    rig.device.send_event(&newer, EVENT_SIZE as u32);
    rig.driver.service();
    assert_eq!(rig.driver.next_event(), Some(newer));
    assert!(
        !rig.driver.needs_reset(),
        "an unknown event kind is ignored"
    );
    let (_, done) = rig.read_answered(&header(1, FRAMES), READ_LEN as u32);
    assert!(matches!(done.outcome, ReadOutcome::Data(_)));
}

/// spec: [3-6] re-initialising after a reset, the driver reads FEATURES_OK back too.
#[test]
fn recover_gives_up_when_the_device_no_longer_accepts_the_features() {
    let mut rig = rig();
    rig.device
        .send_event(&event(kind::NEEDS_RESET, 1), EVENT_SIZE as u32);
    rig.driver.service();
    assert!(rig.driver.needs_reset());
    rig.device.with_state(|s| s.refuse_features = true);
    let mut wait = FakeWait::new(&rig.device).answer(
        opcode::GET_STATUS,
        status::OK,
        Status::default().as_bytes(),
    );
    let result = rig.driver.recover(&mut wait);
    assert!(
        matches!(result, Err(DriverError::FeaturesRefused(_))),
        "{result:?}"
    );
    rig.device.with_state(|s| {
        let since_reset = s
            .status_writes
            .iter()
            .rposition(|w| w.is_empty())
            .expect("the device was reset");
        assert!(
            s.status_writes[since_reset..]
                .iter()
                .all(|w| !w.contains(DeviceStatus::DRIVER_OK)),
            "DRIVER_OK not set again: {:?}",
            s.status_writes
        );
        assert!(s.status.contains(DeviceStatus::FAILED), "{:?}", s.status);
    });
    assert!(rig.driver.needs_reset(), "still unusable");
}

/// spec: [4-6] never a config-space write, through init, commands, notifications, recovery
/// and shutdown.
#[test]
fn the_driver_never_writes_the_configuration_space() {
    let mut rig = rig();
    let settings = valid_settings();
    let mut wait = FakeWait::new(&rig.device)
        .then(configure_step(settings))
        .answer(opcode::GET_STATUS, status::OK, Status::default().as_bytes());
    rig.driver
        .configure(&settings, &mut wait)
        .expect("CONFIGURE");
    rig.driver.status(&mut wait).expect("GET_STATUS");
    rig.device.set_config(|c| c.latency_us = 2_000.into());
    rig.device.interrupt(fake::CAUSE_CONFIG_CHANGE);
    rig.driver.service();
    rig.device
        .send_event(&event(kind::NEEDS_RESET, 1), EVENT_SIZE as u32);
    rig.driver.service();
    let mut wait = FakeWait::new(&rig.device)
        .answer(opcode::GET_STATUS, status::OK, Status::default().as_bytes())
        .answer(opcode::STOP, status::OK, &[])
        .then(flush_step(Vec::new(), 0))
        .answer(opcode::GET_STATUS, status::OK, Status::default().as_bytes());
    rig.driver.recover(&mut wait).expect("recover");
    rig.driver.shutdown(&mut wait).expect("shutdown");
    assert_eq!(wait.steps_left(), 0);
    rig.device.with_state(|s| {
        assert!(s.config_reads >= 4, "read, {} times", s.config_reads);
        assert_eq!(s.config_writes, 0, "never written");
    });
}

/// spec: [4-7] the counters the driver reports come from GET_STATUS, one snapshot, not from
/// config-space reads that can tear.
#[test]
fn counters_for_recovery_and_shutdown_come_from_get_status() {
    let mut rig = rig();
    // The config space's counters disagree (a torn read, or simply later values).
    rig.device.set_config(|c| {
        c.frames_produced = 0xffff_ffff_0000_0000.into();
        c.frames_delivered = 0x0000_0001_ffff_ffff.into();
        c.buffers_completed = 999.into();
    });
    let at_reset = Status {
        frames_produced: 100.into(),
        frames_delivered: 90.into(),
        frames_dropped: 10.into(),
        buffers_completed: 6.into(),
        state: DaqState::NeedsReset as u8,
        ..Default::default()
    };
    let at_shutdown = Status {
        frames_produced: 50.into(),
        frames_delivered: 50.into(),
        buffers_completed: 4.into(),
        ..Default::default()
    };
    rig.device
        .send_event(&event(kind::NEEDS_RESET, 1), EVENT_SIZE as u32);
    rig.driver.service();
    let mut wait = FakeWait::new(&rig.device)
        .answer(opcode::GET_STATUS, status::OK, at_reset.as_bytes())
        .answer(opcode::STOP, status::OK, &[])
        .then(flush_step(Vec::new(), 0))
        .answer(opcode::GET_STATUS, status::OK, at_shutdown.as_bytes());
    let recovery = rig.driver.recover(&mut wait).expect("recover");
    assert_eq!(recovery.status, Some(at_reset));
    let shutdown = rig.driver.shutdown(&mut wait).expect("shutdown");
    assert_eq!(shutdown.status, at_shutdown);
}

/// spec: [4-8] on a configuration-change notification the driver reads its settings again:
/// the frame size it checks reads against, and the rate and latency its posting rule uses.
#[test]
fn configuration_change_makes_the_driver_read_its_settings_again() {
    let mut rig = rig();
    assert_eq!(rig.driver.frame_bytes(), FRAME);
    assert_eq!(rig.driver.settings().latency_us.get(), 10_000);
    rig.device.set_config(|c| {
        c.channels = 4.into();
        c.latency_us = 20_000.into();
        c.signal = vdaq_wire::SignalKind::Sine as u8;
    });
    // Without the notification the driver goes by what it read before.
    rig.device.interrupt(CAUSE_USED_BUFFER);
    rig.driver.service();
    assert_eq!(rig.driver.frame_bytes(), FRAME);
    rig.device.interrupt(fake::CAUSE_CONFIG_CHANGE);
    rig.driver.service();
    assert_eq!(rig.driver.frame_bytes(), 2 * FRAME, "4 channels of s32");
    let settings = rig.driver.settings();
    assert_eq!(settings.latency_us.get(), 20_000);
    assert_eq!(settings.signal, vdaq_wire::SignalKind::Sine as u8);
    assert_eq!(
        rig.driver.frames_to_keep_posted(),
        48_000 * 20_000 / 1_000_000
    );
    // A buffer sized for the old frame is too small now.
    let (err, _) = rig
        .driver
        .submit_read(Buffer::new(HEADER_SIZE + FRAME))
        .expect_err("too small for a frame of 4 channels");
    assert!(matches!(
        err,
        DriverError::BufferTooSmall { needed, .. } if needed == HEADER_SIZE + 2 * FRAME
    ));
    assert!(!rig.driver.needs_reset());
}

/// spec: [5-1] eventq has its buffers before the first command, also after a recovery.
#[test]
fn event_buffers_are_posted_before_the_first_command() {
    let mut rig = rig();
    let first_command = |device: &FakeDevice| {
        assert_eq!(
            device.avail_pending(queue::EVENT),
            EVENT_BUFFERS,
            "event buffers posted before the command"
        );
        let command = device.take_command();
        assert_eq!(command.opcode(), opcode::START);
        device.reply(&command, status::OK, &[]);
    };
    rig.device
        .with_state(|s| assert_eq!(s.notifications[usize::from(queue::CONTROL)], 0));
    let mut wait = FakeWait::new(&rig.device).then(first_command);
    rig.driver.start(&mut wait).expect("START");
    rig.device
        .send_event(&event(kind::NEEDS_RESET, 1), EVENT_SIZE as u32);
    rig.driver.service();
    let mut wait = FakeWait::new(&rig.device)
        .answer(opcode::GET_STATUS, status::OK, Status::default().as_bytes())
        .then(first_command);
    rig.driver.recover(&mut wait).expect("recover");
    rig.driver.start(&mut wait).expect("START after the reset");
    assert_eq!(wait.steps_left(), 0);
}

/// spec: [6.2-8] the driver knows how much buffer space one latency bound needs and how
/// much is posted (START warns when short).
#[test]
fn posted_frames_are_measured_against_one_latency_bound() {
    let mut rig = rig();
    // 48 kHz × 10 ms.
    assert_eq!(rig.driver.frames_to_keep_posted(), 480);
    assert_eq!(rig.driver.posted_frames(), 0);
    for _ in 0..30 {
        rig.submit(READ_LEN);
    }
    assert_eq!(rig.driver.posted_frames(), 30 * FRAMES as u64);
    // Capacity is whole frames: trailing bytes hold none.
    rig.submit(HEADER_SIZE + 2 * FRAME - 1);
    assert_eq!(rig.driver.posted_frames(), 481);
    let chain = rig.device.take_read();
    rig.device.fill_read(&chain, &header(0, FRAMES), &[]);
    rig.device.complete(&chain, READ_LEN as u32);
    rig.device.interrupt(CAUSE_USED_BUFFER);
    rig.driver.service();
    assert_eq!(
        rig.driver.posted_frames(),
        481 - FRAMES as u64,
        "a completed read holds no more space"
    );
    assert!(rig.driver.posted_frames() < rig.driver.frames_to_keep_posted());
    // Rounded up: 44.1 kHz × 1 ms is 44.1 frames.
    rig.device.set_config(|c| {
        c.rate_hz = 44_100.into();
        c.latency_us = 1_000.into();
    });
    rig.device.interrupt(fake::CAUSE_CONFIG_CHANGE);
    rig.driver.service();
    assert_eq!(rig.driver.frames_to_keep_posted(), 45);
    rig.device
        .set_config(|c| c.clock = vdaq_wire::ClockMode::FreeRunning as u8);
    rig.device.interrupt(fake::CAUSE_CONFIG_CHANGE);
    rig.driver.service();
    assert_eq!(
        rig.driver.frames_to_keep_posted(),
        0,
        "the free-running clock never overruns"
    );
}

/// spec: [6.7-2] one notification, many used entries on every queue: all are taken.
#[test]
fn one_interrupt_takes_every_used_entry_of_every_queue() {
    let mut rig = rig();
    let ids: Vec<RequestId> = (0..5).map(|_| rig.submit(READ_LEN)).collect();
    for i in 0..5 {
        let chain = rig.device.take_read();
        rig.device.fill_read(&chain, &header(i, FRAMES), &[]);
        rig.device.complete(&chain, READ_LEN as u32);
    }
    let events = [event(kind::OVERRUN, 3), event(kind::FAULT, 9)];
    for e in &events {
        let chain = rig.device.take_event_buffer();
        chain.write(0, e.as_bytes());
        rig.device.complete(&chain, EVENT_SIZE as u32);
    }
    let answer = Status {
        frames_produced: 1.into(),
        ..Default::default()
    };
    let mut wait = FakeWait::new(&rig.device).then(move |device| {
        // The reply's interrupt is the only one, for all three queues.
        let command = device.take_command();
        device.reply(&command, status::OK, answer.as_bytes());
    });
    assert_eq!(rig.driver.status(&mut wait).expect("GET_STATUS"), answer);
    assert_eq!(rig.driver.stats().bottom_halves, 1, "one interrupt");
    for id in ids {
        assert_eq!(rig.driver.next_completion().expect("completion").id, id);
    }
    assert_eq!(rig.driver.next_event(), Some(events[0]));
    assert_eq!(rig.driver.next_event(), Some(events[1]));
    assert!(!rig.driver.completions_waiting());
    assert_eq!(rig.device.avail_pending(queue::EVENT), EVENT_BUFFERS);
}

/// spec: [6.8-7] reserved fields go out as zero, whatever the caller left in them.
#[test]
fn reserved_fields_go_out_as_zero() {
    let options = DriverOptions {
        trigger: true,
        ..Default::default()
    };
    let (device, driver) = try_rig(feature::DEVICE_FEATURES, options, |_| {});
    let mut rig = Rig {
        device,
        driver: driver.expect("init"),
    };
    let settings = Configure {
        reserved: [0xff; 7],
        ..valid_settings()
    };
    let trigger = control::TriggerConfig {
        mode: control::trigger_mode::RISING,
        reserved: 0xaa,
        channel: 1.into(),
        threshold_ppm: 5_000.into(),
        pre_frames: 0.into(),
        post_frames: 64.into(),
    };
    let mut wait = FakeWait::new(&rig.device)
        .then(move |device| {
            let command = device.take_command();
            assert_eq!(command.header.reserved.get(), 0);
            let sent = Configure {
                reserved: [0; 7],
                ..settings
            };
            assert_eq!(
                command.payload,
                sent.as_bytes(),
                "reserved zeroed, rest as given"
            );
            device.reply(&command, status::OK, &[]);
        })
        .then(move |device| {
            let command = device.take_command();
            assert_eq!(command.opcode(), opcode::SET_TRIGGER);
            assert_eq!(command.header.reserved.get(), 0);
            let sent = control::TriggerConfig {
                reserved: 0,
                ..trigger
            };
            assert_eq!(command.payload, sent.as_bytes());
            device.reply(&command, status::OK, &[]);
        })
        .then(|device| {
            let command = device.take_command();
            assert_eq!(command.opcode(), opcode::TRIGGER);
            assert_eq!(command.header.reserved.get(), 0);
            device.reply(&command, status::OK, &[]);
        });
    rig.driver
        .configure(&settings, &mut wait)
        .expect("CONFIGURE");
    rig.driver
        .set_trigger(&trigger, &mut wait)
        .expect("SET_TRIGGER");
    rig.driver.trigger(&mut wait).expect("TRIGGER");
    assert_eq!(wait.steps_left(), 0);
}

/// spec: [6.8-8] each request is the header and exactly its opcode's payload, with room for
/// the reply header and its payload; a payload of another size is not sent.
#[test]
fn every_command_is_framed_with_its_payload_and_room_for_its_reply() {
    let options = DriverOptions {
        trigger: true,
        ..Default::default()
    };
    let (device, driver) = try_rig(feature::DEVICE_FEATURES, options, |_| {});
    let mut rig = Rig {
        device,
        driver: driver.expect("init"),
    };
    for op in control::Opcode::ALL {
        let mut wait = FakeWait::new(&rig.device).then(move |device| {
            let command = device.take_command();
            assert_eq!(command.opcode(), op.code());
            let chain = &command.chain;
            assert!(chain.is_well_ordered());
            assert_eq!(
                chain.readable_len(),
                size_of::<control::CommandHeader>() + op.payload_size(),
                "{op:?}"
            );
            assert!(
                chain.writable_len() >= size_of::<ResponseHeader>() + op.reply_payload_size(),
                "{op:?}"
            );
            device.reply(&command, status::OK, &vec![0; op.reply_payload_size()]);
        });
        let payload = vec![0; op.payload_size()];
        let (code, reply) = rig
            .driver
            .command_raw(op.code(), &payload, &mut wait)
            .expect("reply");
        assert_eq!((code, reply.len()), (status::OK, op.reply_payload_size()));
    }
    let sent = rig
        .device
        .with_state(|s| s.notifications[usize::from(queue::CONTROL)]);
    for (op, len) in [
        (opcode::START, 1),
        (opcode::GET_STATUS, 8),
        (opcode::CONFIGURE, size_of::<Configure>() - 1),
        (opcode::CONFIGURE, size_of::<Configure>() + 1),
        (opcode::SET_TRIGGER, 0),
    ] {
        let result = rig
            .driver
            .command_raw(op, &vec![0; len], &mut FakeWait::new(&rig.device));
        let expected = command_payload_size(op).expect("known");
        assert!(
            matches!(
                result,
                Err(DriverError::PayloadSize { opcode: o, len: l, expected: e })
                    if (o, l, e) == (op, len, expected)
            ),
            "opcode {op} with {len} bytes: {result:?}"
        );
    }
    assert_eq!(rig.device.avail_pending(queue::CONTROL), 0, "nothing sent");
    rig.device.with_state(|s| {
        assert_eq!(s.notifications[usize::from(queue::CONTROL)], sent);
    });
}

/// spec: [6.8-9] CONFIGURE is checked against the limits the configuration space states.
#[test]
fn configure_checks_the_settings_against_the_limits_the_device_states() {
    // A card with other limits than the rig's default: S16 and S32 only, up to 200 kHz.
    let (device, driver) = try_rig(feature::DEVICE_FEATURES, DriverOptions::default(), |d| {
        d.set_config(|c| {
            c.supported_formats = (SampleFormat::S16.mask() | SampleFormat::S32.mask()).into();
            c.max_rate_hz = 200_000.into();
        })
    });
    let mut rig = Rig {
        device,
        driver: driver.expect("init"),
    };
    type Spoil = fn(&mut Configure);
    let cases: [(Spoil, &str); 13] = [
        (|s| s.channels = 17.into(), "channels"),
        (|s| s.channels = 0.into(), "channels"),
        (|s| s.format = SampleFormat::F32 as u8, "format"),
        (|s| s.format = 9, "format"),
        (|s| s.rate_hz = 200_001.into(), "rate_hz"),
        (|s| s.rate_hz = 0.into(), "rate_hz"),
        (|s| s.latency_us = 0.into(), "latency_us"),
        (|s| s.watermark_frames = 4097.into(), "watermark_frames"),
        (|s| s.watermark_frames = 0.into(), "watermark_frames"),
        (|s| s.coalesce_buffers = 0.into(), "coalesce_buffers"),
        (|s| s.amplitude_permille = 1001.into(), "amplitude_permille"),
        (|s| s.signal = 6, "signal"),
        (|s| s.clock = 2, "clock"),
    ];
    for (spoil, field) in cases {
        let mut settings = valid_settings();
        spoil(&mut settings);
        let reads = rig.device.with_state(|s| s.config_reads);
        let result = rig
            .driver
            .configure(&settings, &mut FakeWait::new(&rig.device));
        assert!(
            matches!(result, Err(DriverError::OutOfRange(f)) if f == field),
            "{field}: {result:?}"
        );
        assert!(
            rig.device.with_state(|s| s.config_reads) > reads,
            "{field}: the limits were read"
        );
        assert_eq!(
            rig.device.avail_pending(queue::CONTROL),
            0,
            "{field}: not sent"
        );
    }
    // At the limits, it goes out.
    let settings = Configure {
        channels: 16.into(),
        rate_hz: 200_000.into(),
        watermark_frames: 4096.into(),
        format: SampleFormat::S16 as u8,
        amplitude_permille: 1000.into(),
        signal: vdaq_wire::SignalKind::File as u8,
        clock: vdaq_wire::ClockMode::FreeRunning as u8,
        ..valid_settings()
    };
    let mut wait = FakeWait::new(&rig.device).then(configure_step(settings));
    rig.driver
        .configure(&settings, &mut wait)
        .expect("CONFIGURE at the limits");
    assert_eq!(rig.driver.frame_bytes(), 16 * 2);
}

/// spec: [6.8-10] when the wait gives up, the driver looks at controlq's used ring once more:
/// a reply whose interrupt was lost is taken, not a timeout.
#[test]
fn a_reply_whose_interrupt_was_lost_is_found_when_the_wait_gives_up() {
    let mut rig = rig();
    let answer = Status {
        frames_produced: 9.into(),
        ..Default::default()
    };
    let mut wait = FakeWait::new(&rig.device).then_time_out(move |device| {
        let command = device.take_command();
        device.reply_without_interrupt(&command, status::OK, answer.as_bytes());
    });
    assert_eq!(
        rig.driver.status(&mut wait).expect("the reply is there"),
        answer
    );
    assert_eq!(wait.waits, 1, "found after the wait gave up");
    assert_eq!(rig.driver.stats().replies_after_timeout, 1);
    assert_eq!(rig.driver.violation(), None, "late is not missing");
    // The control queue is free again.
    let mut wait = FakeWait::new(&rig.device).answer(opcode::START, status::OK, &[]);
    rig.driver.start(&mut wait).expect("START");
    assert_eq!(rig.driver.stats().replies_after_timeout, 1);
}

#[test]
fn shutdown_finds_a_read_returned_without_an_interrupt_when_the_wait_gives_up() {
    let mut rig = rig();
    let id = rig.submit(READ_LEN);
    let chain = rig.device.take_read();
    let mut wait = FakeWait::new(&rig.device)
        .answer(opcode::STOP, status::OK, &[])
        .then(flush_step(Vec::new(), 0))
        .then(move |device| {
            device.fill_read(&chain, &flushed(0), &[]);
            device.complete(&chain, HEADER_SIZE as u32);
        })
        .time_out()
        .answer(opcode::GET_STATUS, status::OK, Status::default().as_bytes());
    let report = rig.driver.shutdown(&mut wait).expect("shutdown");
    assert_eq!(report.returned, 1);
    assert_eq!(rig.driver.next_completion().expect("returned").id, id);
    assert_eq!(wait.steps_left(), 0);
}

/// spec: [6.9-4] eventq stays supplied through many more events than it has buffers.
#[test]
fn eventq_stays_supplied_through_more_events_than_buffers() {
    let mut rig = rig();
    for n in 0..3 * EVENT_QUEUE_SIZE as u64 {
        let e = event(kind::OVERRUN, n);
        rig.device.send_event(&e, EVENT_SIZE as u32);
        rig.driver.service();
        assert_eq!(rig.driver.next_event(), Some(e));
        assert_eq!(
            rig.device.avail_pending(queue::EVENT),
            EVENT_BUFFERS,
            "event {n}"
        );
    }
    assert_eq!(rig.driver.stats().events, 3 * u64::from(EVENT_QUEUE_SIZE));
}

/// spec: [6.9-5] event kinds the driver does not know change nothing (the application still
/// sees them, as they came).
#[test]
fn unknown_event_kinds_are_ignored() {
    let mut rig = rig();
    for unknown in [0, 5, 0x100, u32::MAX] {
        // arg0 1 is what a NEEDS_RESET event would carry.
        let e = event(unknown, 1);
        rig.device.send_event(&e, EVENT_SIZE as u32);
        rig.driver.service();
        assert_eq!(rig.driver.next_event(), Some(e), "kind {unknown}");
        assert!(!rig.driver.needs_reset(), "kind {unknown}");
        assert_eq!(rig.device.avail_pending(queue::EVENT), EVENT_BUFFERS);
    }
    let (_, done) = rig.read_answered(&header(0, FRAMES), READ_LEN as u32);
    assert!(matches!(done.outcome, ReadOutcome::Data(_)));
}

/// spec: [6.13-6] NEEDS_RESET in the config space: no more reads, and recovery resets the
/// device before using it again.
#[test]
fn needs_reset_in_the_configuration_space_stops_reads_until_the_device_is_reset() {
    let mut rig = rig();
    let id = rig.submit(READ_LEN);
    rig.device.take_read();
    rig.device.set_config(|c| {
        c.state = DaqState::NeedsReset as u8;
        c.fault_code = vdaq_wire::event::fault::QUEUE_CORRUPT.into();
    });
    rig.device.interrupt(fake::CAUSE_CONFIG_CHANGE);
    rig.driver.service();
    assert!(rig.driver.needs_reset());
    assert!(matches!(
        rig.driver.submit_read(Buffer::new(READ_LEN)),
        Err((DriverError::NeedsReset, _))
    ));
    assert_eq!(rig.device.avail_pending(queue::DATA), 0, "nothing posted");
    let resets = rig.device.with_state(|s| s.resets);
    // The reset brings the power-on configuration back.
    let device = rig.device.clone();
    rig.device.on_reset(move || {
        device.set_config(|c| {
            c.state = DaqState::Stopped as u8;
            c.fault_code = 0.into();
        })
    });
    let mut wait = FakeWait::new(&rig.device).answer(
        opcode::GET_STATUS,
        status::OK,
        Status {
            state: DaqState::NeedsReset as u8,
            ..Default::default()
        }
        .as_bytes(),
    );
    let report = rig.driver.recover(&mut wait).expect("recover");
    assert_eq!(report.reclaimed, 1);
    assert_eq!(rig.driver.next_completion().expect("reclaimed").id, id);
    assert!(rig.device.with_state(|s| s.resets) > resets, "reset");
    assert_eq!(rig.device.status(), init_status());
    assert!(!rig.driver.needs_reset());
    rig.submit(READ_LEN);
}

// ---------------------------------------------------------------------------------------------
// Protocol violations are named (issue: the device is untrusted)
// ---------------------------------------------------------------------------------------------

/// spec: [7-4] used lengths and headers checked before the contents are used.
#[test]
fn each_lie_of_a_completion_is_the_violation_it_names() {
    type Lie = (&'static str, fn(&mut BufferHeader) -> u32, Violation);
    let lies: [Lie; 5] = [
        (
            "over",
            |_| READ_LEN as u32 + 64,
            Violation::UsedLengthOverBuffer,
        ),
        (
            "under",
            |_| HEADER_SIZE as u32 / 2,
            Violation::UsedLengthUnderHeader,
        ),
        (
            "frame count",
            |h| {
                h.frame_count.set(h.frame_count.get() + 1);
                READ_LEN as u32
            },
            Violation::HeaderLength,
        ),
        (
            "channels",
            |h| {
                h.channels.set(CHANNELS + 1);
                READ_LEN as u32
            },
            Violation::HeaderConfiguration,
        ),
        (
            "format",
            |h| {
                h.format = 0xee;
                READ_LEN as u32
            },
            Violation::HeaderConfiguration,
        ),
    ];
    for (what, lie, expected) in lies {
        let mut rig = rig();
        let mut written = header(0, FRAMES);
        let used = lie(&mut written);
        assert!(
            matches!(rig.outcome(&written, used), ReadOutcome::Invalid { .. }),
            "{what}"
        );
        assert_eq!(rig.driver.violation(), Some(expected), "{what}");
        assert_eq!(rig.driver.stats().violations, 1, "{what}");
        assert!(
            !rig.driver.needs_reset(),
            "{what}: one bad buffer, not a bad ring"
        );
    }
}

/// spec: [7-4] replies checked: size and status.
#[test]
fn each_lie_of_a_reply_is_the_violation_it_names() {
    type Lie = (&'static str, Vec<u8>, u32, Violation);
    let header_with = |status: u32| {
        let mut bytes = ResponseHeader {
            status: status.into(),
            reserved: 0.into(),
        }
        .as_bytes()
        .to_vec();
        bytes.extend_from_slice(Status::default().as_bytes());
        bytes
    };
    let full = (8 + size_of::<Status>()) as u32;
    let lies: [Lie; 3] = [
        ("short", header_with(status::OK), 4, Violation::ReplyShort),
        ("long", header_with(status::OK), 4096, Violation::ReplyLong),
        ("status", header_with(0xbad), full, Violation::ReplyStatus),
    ];
    for (what, bytes, used, expected) in lies {
        let mut rig = rig();
        let mut wait = FakeWait::new(&rig.device).then(move |device| {
            let command = device.take_command();
            device.reply_raw(&command, &bytes, used);
        });
        assert!(
            matches!(
                rig.driver.status(&mut wait),
                Err(DriverError::BadReply(opcode::GET_STATUS))
            ),
            "{what}"
        );
        assert_eq!(rig.driver.violation(), Some(expected), "{what}");
        // The control queue is usable again.
        let mut wait = FakeWait::new(&rig.device).answer(opcode::START, status::OK, &[]);
        rig.driver.start(&mut wait).expect(what);
    }
}

#[test]
fn a_reply_without_an_interrupt_is_found_at_the_next_wake_up_not_at_the_timeout() {
    let mut rig = rig();
    let mut wait = FakeWait::new(&rig.device)
        .then(|device| {
            let command = device.take_command();
            device.reply_without_interrupt(&command, status::OK, &[]);
        })
        .time_out();
    rig.driver.start(&mut wait).expect("START");
    assert_eq!(wait.waits, 1, "taken at the first wake-up");
    assert_eq!(rig.driver.stats().replies_polled, 1);
    assert_eq!(rig.driver.stats().replies_after_timeout, 0);
}

#[test]
fn an_impossible_configuration_space_after_a_change_is_a_violation_and_recovery_refuses_it() {
    let mut rig = rig();
    rig.device.set_config(|c| c.channels = 0.into());
    rig.device.interrupt(fake::CAUSE_CONFIG_CHANGE);
    rig.driver.service();
    assert_eq!(rig.driver.violation(), Some(Violation::ConfigImpossible));
    assert!(rig.driver.needs_reset());
    let mut wait = FakeWait::new(&rig.device);
    assert!(matches!(
        rig.driver.recover(&mut wait),
        Err(DriverError::NotVdaq(IdentityError::Channels(0)))
    ));
    assert!(rig.device.status().contains(DeviceStatus::FAILED));
}

#[test]
fn unknown_event_kinds_are_counted() {
    let mut rig = rig();
    rig.device.send_event(&event(0x7ffe, 0), EVENT_SIZE as u32);
    rig.device
        .send_event(&event(kind::FAULT, 3), EVENT_SIZE as u32);
    rig.driver.service();
    assert_eq!(rig.driver.stats().unknown_events, 1);
    assert_eq!(rig.driver.stats().events, 2);
    assert_eq!(
        rig.driver.violation(),
        None,
        "not a violation (spec 5.x.6.9)"
    );
}

/// spec: [7-5] a read whose header skips the device's own numbering is kept until the reset.
#[test]
fn a_read_whose_sequence_skips_is_kept_until_the_reset() {
    let mut rig = rig();
    let (_, first) = rig.read_answered(&header(0, FRAMES), READ_LEN as u32);
    assert!(matches!(first.outcome, ReadOutcome::Data(_)));
    let id = rig.submit(READ_LEN);
    let chain = rig.device.take_read();
    rig.device.fill_read(
        &chain,
        &header(2, FRAMES),
        &payload(1, READ_LEN - HEADER_SIZE),
    );
    rig.device.complete(&chain, READ_LEN as u32);
    rig.device.interrupt(CAUSE_USED_BUFFER);
    rig.driver.service();
    assert!(rig.driver.next_completion().is_none(), "not handed back");
    assert_eq!(rig.driver.violation(), Some(Violation::CompletionOrder));
    assert!(rig.driver.needs_reset());
    // Looking again counts nothing new.
    rig.device.interrupt(CAUSE_USED_BUFFER);
    rig.driver.service();
    assert_eq!(rig.driver.stats().violations, 1);
    let report = rig
        .driver
        .recover(&mut FakeWait::new(&rig.device))
        .expect("recover");
    assert_eq!(report.reclaimed, 1);
    let back = rig.driver.next_completion().expect("reclaimed");
    assert_eq!((back.id, back.outcome), (id, ReadOutcome::Reclaimed));
    // The reset device numbers from 0 again.
    let (_, again) = rig.read_answered(&header(0, FRAMES), READ_LEN as u32);
    assert!(matches!(again.outcome, ReadOutcome::Data(_)));
}
