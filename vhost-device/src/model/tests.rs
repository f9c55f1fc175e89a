use super::*;
use vdaq_wire::buffer::{flags, status as buffer_status, HEADER_SIZE};
use vdaq_wire::control::{opcode, CommandStatus, Configure, Status};
use vdaq_wire::event::{kind, EVENT_BACKLOG};
use vdaq_wire::pattern::verify_counter;
use vdaq_wire::zerocopy::{FromBytes, IntoBytes};
use vdaq_wire::{ClockMode, SampleFormat, SignalKind};

/// A read buffer in plain memory; can be told to fail writes.
#[derive(Debug)]
struct VecBuffer {
    bytes: Vec<u8>,
    fail_writes: bool,
}

impl VecBuffer {
    fn new(total: usize) -> Self {
        VecBuffer {
            bytes: vec![0xaa; total],
            fail_writes: false,
        }
    }

    fn header(&self) -> BufferHeader {
        BufferHeader::read_from_bytes(&self.bytes[..HEADER_SIZE]).expect("header")
    }

    fn payload(&self) -> &[u8] {
        let header = self.header();
        &self.bytes[HEADER_SIZE..HEADER_SIZE + header.payload_bytes().expect("format")]
    }
}

impl ReadBuffer for VecBuffer {
    fn payload_capacity(&self) -> usize {
        self.bytes.len().saturating_sub(HEADER_SIZE)
    }

    fn write_payload(&mut self, offset: usize, data: &[u8]) -> Result<(), BufferWriteError> {
        if self.fail_writes {
            return Err(BufferWriteError {
                offset,
                len: data.len(),
            });
        }
        self.bytes[HEADER_SIZE + offset..HEADER_SIZE + offset + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn write_header(&mut self, header: &BufferHeader) -> Result<(), BufferWriteError> {
        if self.bytes.len() < HEADER_SIZE {
            return Err(BufferWriteError {
                offset: 0,
                len: HEADER_SIZE,
            });
        }
        self.bytes[..HEADER_SIZE].copy_from_slice(header.as_bytes());
        Ok(())
    }
}

const MS: u64 = 1_000_000;

fn settings() -> Settings {
    Settings {
        rate_hz: 1000,
        channels: 2,
        format: SampleFormat::S32,
        signal_freq_mhz: 1000,
        amplitude_permille: 1000,
        seed: 1,
        latency_us: 1_000_000,
        watermark_frames: 1,
        ..Settings::default()
    }
}

fn limits(fifo_frames: u32) -> Limits {
    Limits {
        fifo_frames,
        ..Limits::default()
    }
}

fn card(settings: Settings, fifo_frames: u32) -> Card<VecBuffer> {
    Card::new(settings, limits(fifo_frames)).expect("valid settings")
}

/// A buffer with room for `frames` frames of 2 × S32.
fn buffer(frames: usize) -> VecBuffer {
    VecBuffer::new(HEADER_SIZE + frames * 8)
}

/// Verifies a completed counter-pattern buffer and returns its header.
fn verified(completion: &Completion<VecBuffer>) -> BufferHeader {
    let header = completion.buffer.header();
    assert_eq!(header.status, buffer_status::OK);
    let payload = completion.buffer.payload();
    assert_eq!(completion.used_len as usize, HEADER_SIZE + payload.len());
    let first_sample = header.first_frame.get() * u64::from(header.channels.get());
    assert_eq!(
        verify_counter(SampleFormat::S32, first_sample, payload),
        None,
        "payload follows the counter pattern"
    );
    header
}

#[test]
fn free_running_fills_every_posted_buffer_with_a_continuous_stream() {
    let mut card = card(
        Settings {
            clock: ClockMode::FreeRunning,
            ..settings()
        },
        1024,
    );
    let mut out = Vec::new();
    assert_eq!(card.start(0), CommandStatus::Ok);
    for _ in 0..3 {
        card.post(buffer(100), 5, &mut out);
    }
    card.advance(10, &mut out);
    assert_eq!(out.len(), 3);
    for (i, completion) in out.iter().enumerate() {
        let header = verified(completion);
        assert_eq!(header.sequence.get(), i as u64);
        assert_eq!(header.first_frame.get(), 100 * i as u64);
        assert_eq!(header.frame_count.get(), 100);
        assert_eq!(header.rate_hz.get(), 0);
        assert_eq!(header.flags.get() & flags::OVERRUN, 0);
    }
    assert_eq!(card.counters().frames_delivered, 300);
    assert_eq!(card.counters().frames_produced, 300);
}

#[test]
fn paced_clock_produces_frames_at_the_configured_rate() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    card.post(buffer(50), 0, &mut out);
    card.post(buffer(50), 0, &mut out);
    card.start(0);
    card.advance(49 * MS, &mut out);
    assert!(out.is_empty(), "49 frames do not fill a 50-frame buffer");
    assert_eq!(card.counters().frames_produced, 49);
    card.advance(120 * MS, &mut out);
    assert_eq!(out.len(), 2);
    let second = verified(&out[1]);
    assert_eq!(second.first_frame.get(), 50);
    // Frame 50 was sampled 50 ms after START.
    assert_eq!(second.timestamp_ns.get(), 50 * MS);
    assert_eq!(card.counters().frames_produced, 120);
    assert_eq!(card.frames_pending(), 20);
}

#[test]
fn overrun_drops_frames_counts_them_and_flags_the_next_buffer() {
    let mut card = card(settings(), 100);
    let mut out = Vec::new();
    card.start(0);
    // 250 frames due, FIFO holds 100, no buffer: 150 dropped.
    card.advance(250 * MS, &mut out);
    assert_eq!(card.counters().frames_dropped, 150);
    card.post(buffer(100), 250 * MS, &mut out);
    card.post(buffer(100), 250 * MS, &mut out);
    card.advance(260 * MS, &mut out);
    // First buffer: the 100 FIFO frames (0..100). Frames 250..260 follow the gap.
    assert_eq!(out.len(), 1, "the gap completes the first buffer");
    let first = verified(&out[0]);
    assert_eq!(first.first_frame.get(), 0);
    assert_eq!(first.frame_count.get(), 100);
    assert_eq!(first.flags.get() & flags::OVERRUN, 0);
    card.flush(260 * MS, &mut out);
    let second = verified(&out[1]);
    assert_eq!(second.first_frame.get(), 250);
    assert_eq!(second.dropped_frames.get(), 150);
    assert_ne!(second.flags.get() & flags::OVERRUN, 0);
    assert_ne!(second.flags.get() & flags::FLUSHED, 0);
    let event = card.pop_event().expect("overrun event");
    assert_eq!(event.kind.get(), kind::OVERRUN);
    assert_eq!(event.arg0.get(), 150);
    assert_eq!(event.arg1.get(), 100);
    let c = card.counters();
    assert_eq!(
        c.frames_produced,
        c.frames_delivered + c.frames_dropped + card.frames_pending()
    );
}

/// spec: [6.5-2] an overrun that lasts is reported while it lasts, at most every 100 ms.
#[test]
fn an_ongoing_overrun_is_reported_while_it_lasts_and_the_reports_add_up() {
    let mut card = card(settings(), 100);
    let mut out = Vec::new();
    card.start(0);
    // 1 kHz, FIFO of 100, no buffer: dropping from 100 ms on, for 350 ms, ticked every 5 ms.
    let mut now = 0;
    while now < 450 * MS {
        now += 5 * MS;
        card.advance(now, &mut out);
    }
    let during: Vec<Event> = std::iter::from_fn(|| card.pop_event()).collect();
    assert!(
        (3..=4).contains(&during.len()),
        "one report per 100 ms while it lasts: {during:?}"
    );
    for pair in during.windows(2) {
        assert!(pair[1].timestamp_ns.get() - pair[0].timestamp_ns.get() >= 100 * MS);
    }
    card.post(buffer(200), now, &mut out);
    card.advance(now + 5 * MS, &mut out);
    let events: Vec<Event> = during
        .into_iter()
        .chain(std::iter::from_fn(|| card.pop_event()))
        .collect();
    let mut next_first = 100;
    for event in &events {
        assert_eq!(event.kind.get(), kind::OVERRUN);
        assert_eq!(event.arg1.get(), next_first, "reports are contiguous");
        next_first += event.arg0.get();
    }
    let dropped: u64 = events.iter().map(|e| e.arg0.get()).sum();
    assert_eq!(
        dropped,
        card.counters().frames_dropped,
        "and add up to the loss"
    );
    assert_eq!(dropped, 350);
}

#[test]
fn latency_bound_completes_a_partly_filled_buffer() {
    let mut card = card(
        Settings {
            latency_us: 20_000,
            ..settings()
        },
        1024,
    );
    let mut out = Vec::new();
    card.post(buffer(1000), 0, &mut out);
    card.start(0);
    card.advance(10 * MS, &mut out);
    assert!(out.is_empty());
    card.advance(25 * MS, &mut out);
    assert_eq!(out.len(), 1);
    let header = verified(&out[0]);
    assert_ne!(header.flags.get() & flags::LATENCY, 0);
    assert!(header.frame_count.get() >= 20);
}

#[test]
fn watermark_holds_frames_in_the_fifo_until_reached() {
    let mut card = card(
        Settings {
            watermark_frames: 30,
            ..settings()
        },
        1024,
    );
    let mut out = Vec::new();
    card.post(buffer(10), 0, &mut out);
    card.start(0);
    card.advance(29 * MS, &mut out);
    assert!(out.is_empty());
    assert_eq!(card.frames_pending(), 29);
    card.advance(30 * MS, &mut out);
    assert_eq!(
        out.len(),
        1,
        "watermark reached: the DMA moves a buffer's worth"
    );
}

#[test]
fn flush_returns_every_held_buffer() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    for _ in 0..4 {
        card.post(buffer(100), 0, &mut out);
    }
    card.start(0);
    card.advance(30 * MS, &mut out);
    assert!(out.is_empty());
    assert_eq!(card.flush(30 * MS, &mut out), 4);
    assert_eq!(card.buffers_held(), 0);
    let first = verified(&out[0]);
    assert_eq!(first.frame_count.get(), 30);
    for completion in &out {
        assert_ne!(completion.buffer.header().flags.get() & flags::FLUSHED, 0);
    }
    assert_eq!(out[3].buffer.header().frame_count.get(), 0);
    assert_eq!(out[3].used_len as usize, HEADER_SIZE);
}

/// spec: [6.6-4] FLUSH counts the buffers its own sampling completed too.
#[test]
fn flush_counts_buffers_completed_while_it_samples_the_frames_due() {
    let mut card = card(
        Settings {
            watermark_frames: 16,
            ..settings()
        },
        16,
    );
    let mut out = Vec::new();
    for _ in 0..4 {
        card.post(buffer(100), 0, &mut out);
    }
    card.start(0);
    // 250 frames are due, far more than the 16-frame FIFO: sampling them drains into the
    // buffers, filling two of them, before FLUSH returns the rest.
    assert_eq!(card.flush(250 * MS, &mut out), 4);
    assert_eq!(out.len(), 4);
    assert_eq!(out[0].buffer.header().frame_count.get(), 100);
    assert_eq!(out[1].buffer.header().frame_count.get(), 100);
    assert_eq!(card.buffers_held(), 0);
}

#[test]
fn stop_completes_the_partial_buffer_and_keeps_the_rest_posted() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    card.post(buffer(100), 0, &mut out);
    card.post(buffer(100), 0, &mut out);
    card.start(0);
    assert_eq!(card.stop(42 * MS, &mut out), CommandStatus::Ok);
    assert_eq!(out.len(), 1);
    let header = verified(&out[0]);
    assert_eq!(header.frame_count.get(), 42);
    assert_ne!(header.flags.get() & flags::STOPPED, 0);
    assert_eq!(card.buffers_held(), 1);
    card.advance(500 * MS, &mut out);
    assert_eq!(out.len(), 1, "a stopped clock samples nothing");
}

#[test]
fn restart_continues_the_stream_index() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    card.post(buffer(10), 0, &mut out);
    card.post(buffer(10), 0, &mut out);
    card.start(0);
    card.advance(10 * MS, &mut out);
    card.stop(10 * MS, &mut out);
    card.start(1000 * MS);
    card.advance(1010 * MS, &mut out);
    assert_eq!(out.len(), 2);
    let second = verified(&out[1]);
    assert_eq!(second.first_frame.get(), 10);
    assert_eq!(second.dropped_frames.get(), 0);
    assert_eq!(second.timestamp_ns.get(), 1000 * MS);
}

#[test]
fn commands_answer_with_the_specified_status_codes() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    let configure = Settings {
        channels: 4,
        ..settings()
    }
    .to_wire();
    assert_eq!(
        card.execute(99, &[], 0, &mut out).status,
        CommandStatus::Unsupported
    );
    assert_eq!(
        card.execute(opcode::START, &[0], 0, &mut out).status,
        CommandStatus::BadSize
    );
    assert_eq!(
        card.execute(opcode::CONFIGURE, &configure.as_bytes()[..39], 0, &mut out)
            .status,
        CommandStatus::BadSize
    );
    let bad = Configure {
        channels: 0.into(),
        ..configure
    };
    assert_eq!(
        card.execute(opcode::CONFIGURE, bad.as_bytes(), 0, &mut out)
            .status,
        CommandStatus::Invalid
    );
    let bad_format = Configure {
        format: 7,
        ..configure
    };
    assert_eq!(
        card.execute(opcode::CONFIGURE, bad_format.as_bytes(), 0, &mut out)
            .status,
        CommandStatus::Invalid
    );
    assert_eq!(
        card.execute(opcode::CONFIGURE, configure.as_bytes(), 0, &mut out)
            .status,
        CommandStatus::Ok
    );
    assert_eq!(card.settings().channels, 4);
    assert_eq!(
        card.execute(opcode::START, &[], 0, &mut out).status,
        CommandStatus::Ok
    );
    assert_eq!(
        card.execute(opcode::CONFIGURE, configure.as_bytes(), 0, &mut out)
            .status,
        CommandStatus::Busy
    );
    let reply = card.execute(opcode::GET_STATUS, &[], 5 * MS, &mut out);
    assert_eq!(reply.status, CommandStatus::Ok);
    let status = Status::read_from_bytes(&reply.payload).expect("status payload");
    assert_eq!(status.device_time_ns.get(), 5 * MS);
    assert_eq!(status.state, DeviceState::Running as u8);
}

#[test]
fn software_trigger_flags_the_buffer_and_raises_an_event() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    card.post(buffer(100), 0, &mut out);
    card.start(0);
    card.advance(7 * MS, &mut out);
    assert_eq!(card.trigger(), CommandStatus::Ok);
    card.advance(100 * MS, &mut out);
    let header = verified(&out[0]);
    assert_ne!(header.flags.get() & flags::TRIGGERED, 0);
    assert_eq!(header.trigger_frame.get(), 7);
    let event = card.pop_event().expect("trigger event");
    assert_eq!(event.kind.get(), kind::TRIGGER);
    assert_eq!(event.arg0.get(), 7);
}

#[test]
fn crc_covers_the_payload_when_enabled() {
    let mut card = card(settings(), 1024);
    card.set_crc_enabled(true);
    let mut out = Vec::new();
    card.post(buffer(64), 0, &mut out);
    card.start(0);
    card.advance(30 * MS, &mut out);
    card.advance(64 * MS, &mut out);
    let header = verified(&out[0]);
    assert_ne!(header.flags.get() & flags::CRC_VALID, 0);
    assert_eq!(
        header.crc32.get(),
        vdaq_wire::payload_crc32(out[0].buffer.payload())
    );
}

#[test]
fn coalescing_notifies_once_per_n_completions_or_at_the_latency_bound() {
    let mut card = card(
        Settings {
            clock: ClockMode::FreeRunning,
            coalesce_buffers: 4,
            latency_us: 1000,
            ..settings()
        },
        1024,
    );
    let mut out = Vec::new();
    card.start(0);
    let mut notifications = 0;
    for _ in 0..16 {
        card.post(buffer(10), 0, &mut out);
        card.advance(0, &mut out);
        if card.take_notification(0, false) {
            notifications += 1;
        }
    }
    assert_eq!(out.len(), 16);
    assert_eq!(notifications, 4);
    card.post(buffer(10), 0, &mut out);
    card.advance(0, &mut out);
    assert!(!card.take_notification(0, false));
    assert!(card.take_notification(MS, false), "latency bound reached");
}

#[test]
fn a_buffer_without_room_for_one_frame_is_rejected_with_a_header() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    card.post(VecBuffer::new(HEADER_SIZE + 7), 0, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].used_len as usize, HEADER_SIZE);
    assert_eq!(out[0].buffer.header().status, buffer_status::BAD_BUFFER);
    assert_eq!(card.counters().requests_rejected, 1);
    assert_eq!(card.buffers_held(), 0);
}

#[test]
fn a_failing_buffer_write_returns_it_empty_and_counts_the_frames_dropped() {
    let mut card = card(
        Settings {
            clock: ClockMode::FreeRunning,
            ..settings()
        },
        1024,
    );
    let mut out = Vec::new();
    let mut bad = buffer(10);
    bad.fail_writes = true;
    card.post(bad, 0, &mut out);
    card.post(buffer(10), 0, &mut out);
    card.start(0);
    card.advance(0, &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].used_len, 0);
    let good = verified(&out[1]);
    assert_eq!(good.first_frame.get(), 10);
    assert_eq!(
        good.dropped_frames.get(),
        10,
        "the lost frames are reported in the next header"
    );
    assert_ne!(good.flags.get() & flags::OVERRUN, 0);
    let c = card.counters();
    assert_eq!(c.frames_dropped, 10);
    assert_eq!(c.frames_produced, c.frames_delivered + c.frames_dropped);
}

#[test]
fn needs_reset_refuses_commands_until_reset() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    card.post(buffer(10), 0, &mut out);
    card.enter_needs_reset(vdaq_wire::event::fault::QUEUE_CORRUPT, 0);
    assert_eq!(card.config_space().state, DeviceState::NeedsReset as u8);
    assert_eq!(
        card.execute(opcode::START, &[], 0, &mut out).status,
        CommandStatus::Busy
    );
    assert_eq!(
        card.execute(opcode::GET_STATUS, &[], 0, &mut out).status,
        CommandStatus::Ok
    );
    assert_eq!(
        card.pop_event().map(|e| e.kind.get()),
        Some(kind::NEEDS_RESET)
    );
    let held = card.reset();
    assert_eq!(held.len(), 1);
    assert_eq!(card.state(), DeviceState::Stopped);
    assert_eq!(card.start(0), CommandStatus::Ok);
}

#[test]
fn config_space_reports_settings_limits_and_counters() {
    let card = card(settings(), 4096);
    let config = card.config_space();
    assert_eq!(config.fifo_frames.get(), 4096);
    assert_eq!(config.channels.get(), 2);
    assert_eq!(config.rate_hz.get(), 1000);
    assert_eq!(config.format, SampleFormat::S32 as u8);
    assert_eq!(config.supported_formats.get(), 0b1110);
    assert_eq!(&config.model[..8], b"vdaq-sim");
    assert_eq!(config.firmware_version.get(), vdaq_wire::FIRMWARE_VERSION);
}

#[test]
fn event_backlog_is_bounded_and_counts_losses() {
    let mut card = card(settings(), 1);
    let mut out = Vec::new();
    card.start(0);
    // Alternate drops and accepted frames: every accepted frame after drops ends an episode.
    for i in 1..=200u64 {
        card.advance(i * 3 * MS, &mut out);
        card.post(buffer(1), i * 3 * MS, &mut out);
        card.advance(i * 3 * MS, &mut out);
    }
    let mut events = 0;
    while card.pop_event().is_some() {
        events += 1;
    }
    assert_eq!(events, EVENT_BACKLOG);
    assert!(card.counters().events_lost > 0);
}

#[test]
fn frames_left_after_stop_complete_in_the_next_buffer() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    card.start(0);
    card.advance(30 * MS, &mut out);
    card.stop(30 * MS, &mut out);
    assert!(out.is_empty(), "no buffer was posted");
    card.post(buffer(100), 40 * MS, &mut out);
    card.advance(40 * MS, &mut out);
    assert_eq!(out.len(), 1);
    let header = verified(&out[0]);
    assert_eq!(header.frame_count.get(), 30);
    assert_ne!(header.flags.get() & flags::STOPPED, 0);
}

#[test]
fn a_pause_between_stop_and_start_ends_the_buffer_and_keeps_timestamps_true() {
    let mut card = card(
        Settings {
            watermark_frames: 1000,
            ..settings()
        },
        4096,
    );
    let mut out = Vec::new();
    card.start(0);
    card.advance(10 * MS, &mut out);
    card.stop(10 * MS, &mut out);
    card.start(500 * MS);
    card.advance(520 * MS, &mut out);
    card.post(buffer(100), 520 * MS, &mut out);
    card.post(buffer(100), 520 * MS, &mut out);
    card.flush(520 * MS, &mut out);
    let first = verified(&out[0]);
    let second = verified(&out[1]);
    assert_eq!((first.first_frame.get(), first.frame_count.get()), (0, 10));
    assert_eq!(first.timestamp_ns.get(), 0);
    assert_eq!(
        first.flags.get(),
        flags::PAUSED,
        "ended by the pause, and says so"
    );
    assert_eq!(
        (second.first_frame.get(), second.frame_count.get()),
        (10, 20)
    );
    assert_eq!(
        second.timestamp_ns.get(),
        500 * MS,
        "sampled after the pause"
    );
    assert_eq!(second.dropped_frames.get(), 0);
}

/// spec: [6.2-4] CONFIGURE that changes the frame size returns every held buffer, in order.
#[test]
fn configure_changing_the_frame_size_returns_every_held_buffer_in_order() {
    let mut card = card(
        Settings {
            clock: ClockMode::FreeRunning,
            ..settings()
        },
        1024,
    );
    let mut out = Vec::new();
    card.post(buffer(10), 0, &mut out); // 80 payload bytes
    card.post(VecBuffer::new(HEADER_SIZE + 12), 0, &mut out); // room for 1 frame of 8 bytes
    card.post(buffer(10), 0, &mut out);
    let wider = Settings {
        channels: 4,
        ..*card.settings()
    };
    assert_eq!(card.configure(wider, 0, &mut out), CommandStatus::Ok);
    assert_eq!(out.len(), 3, "all three held buffers came back");
    let sequences: Vec<u64> = out
        .iter()
        .map(|done| {
            let header = done.buffer.header();
            assert_eq!(header.status, buffer_status::OK);
            assert_eq!(header.frame_count.get(), 0);
            assert_ne!(header.flags.get() & flags::FLUSHED, 0);
            header.sequence.get()
        })
        .collect();
    assert_eq!(
        sequences,
        [0, 1, 2],
        "in the order they were made available"
    );
    assert_eq!(card.buffers_held(), 0);
    card.post(buffer(10), 0, &mut out);
    card.start(0);
    card.advance(0, &mut out);
    let header = out[3].buffer.header();
    assert_eq!(
        header.frame_count.get(),
        5,
        "sized with the new 16-byte frame"
    );
    assert_eq!(header.channels.get(), 4);
    assert_ne!(header.flags.get() & flags::DISCONTINUITY, 0);
}

/// spec: [6.2-4] CONFIGURE that keeps the frame size keeps the held buffers.
#[test]
fn configure_keeping_the_frame_size_keeps_held_buffers() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    card.post(buffer(10), 0, &mut out);
    let faster = Settings {
        rate_hz: card.settings().rate_hz * 2,
        ..*card.settings()
    };
    assert_eq!(card.configure(faster, 0, &mut out), CommandStatus::Ok);
    assert!(out.is_empty());
    assert_eq!(card.buffers_held(), 1);
}

#[test]
fn trigger_needs_the_feature_and_every_trigger_raises_an_event() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    assert_eq!(
        card.execute(opcode::TRIGGER, &[], 0, &mut out).status,
        CommandStatus::Unsupported
    );
    card.set_trigger_enabled(true);
    card.post(buffer(100), 0, &mut out);
    card.start(0);
    card.advance(5 * MS, &mut out);
    assert_eq!(
        card.execute(opcode::TRIGGER, &[], 5 * MS, &mut out).status,
        CommandStatus::Ok
    );
    card.advance(20 * MS, &mut out);
    card.trigger();
    card.advance(100 * MS, &mut out);
    let header = verified(&out[0]);
    assert_eq!(
        header.trigger_frame.get(),
        5,
        "the header keeps the first trigger"
    );
    let triggers: Vec<u64> = std::iter::from_fn(|| card.pop_event())
        .filter(|e| e.kind.get() == kind::TRIGGER)
        .map(|e| e.arg0.get())
        .collect();
    assert_eq!(triggers, vec![5, 20]);
}

#[test]
fn needs_reset_completes_nothing() {
    let mut card = card(
        Settings {
            clock: ClockMode::FreeRunning,
            ..settings()
        },
        1024,
    );
    let mut out = Vec::new();
    card.start(0);
    card.enter_needs_reset(vdaq_wire::event::fault::QUEUE_CORRUPT, 0);
    card.post(buffer(10), 0, &mut out);
    card.advance(MS, &mut out);
    assert!(out.is_empty());
    assert_eq!(card.buffers_held(), 1);
}

#[test]
fn drops_before_an_empty_flushed_buffer_are_reported_in_its_header() {
    let mut card = card(settings(), 100);
    let mut out = Vec::new();
    card.post(buffer(100), 0, &mut out);
    card.start(0);
    card.advance(100 * MS, &mut out); // frames 0..100 fill the only buffer
    card.advance(300 * MS, &mut out); // 100..200 in the FIFO, 200..300 dropped
    card.stop(300 * MS, &mut out);
    card.post(buffer(100), 300 * MS, &mut out);
    card.advance(300 * MS, &mut out); // the FIFO's 100 frames
    card.post(buffer(100), 300 * MS, &mut out);
    card.flush(300 * MS, &mut out);
    assert_eq!(out.len(), 3);
    let empty = out[2].buffer.header();
    assert_eq!(empty.frame_count.get(), 0);
    assert_eq!(empty.first_frame.get(), 300);
    assert_eq!(empty.dropped_frames.get(), 100);
    assert_ne!(empty.flags.get() & flags::OVERRUN, 0);
    let mut verifier = vdaq_wire::check::StreamVerifier::new(SampleFormat::S32, 2, true);
    for completion in &out {
        verifier
            .check(&completion.buffer.bytes, completion.used_len as usize)
            .expect("the stream verifies, drops included");
    }
    assert_eq!(
        verifier.stats().dropped_frames,
        card.counters().frames_dropped
    );
}

#[test]
fn scenario_loses_interrupts_corrupts_a_crc_and_raises_a_fault() {
    let mut card = card(
        Settings {
            clock: ClockMode::FreeRunning,
            ..settings()
        },
        1024,
    );
    card.set_crc_enabled(true);
    card.set_scenario(
        scenario::Scenario::parse(
            "[[step]]\nat_ms = 0\naction = \"drop_interrupts\"\ncount = 2\n\
             [[step]]\nat_ms = 0\naction = \"corrupt_crc\"\ncount = 1\n\
             [[step]]\nat_ms = 0\naction = \"fault\"\ncode = 9\n",
        )
        .expect("valid scenario"),
    );
    let mut out = Vec::new();
    card.start(0);
    for _ in 0..3 {
        card.post(buffer(10), 0, &mut out);
    }
    card.advance(0, &mut out);
    assert_eq!(out.len(), 3);
    let first = out[0].buffer.header();
    assert_ne!(
        first.crc32.get(),
        vdaq_wire::payload_crc32(out[0].buffer.payload())
    );
    let second = verified(&out[1]);
    assert_eq!(
        second.crc32.get(),
        vdaq_wire::payload_crc32(out[1].buffer.payload())
    );
    assert!(!card.take_notification(0, true), "first interrupt lost");
    card.post(buffer(10), 0, &mut out);
    card.advance(0, &mut out);
    assert!(!card.take_notification(0, true), "second interrupt lost");
    card.post(buffer(10), 0, &mut out);
    card.advance(0, &mut out);
    assert!(
        card.take_notification(0, true),
        "then interrupts flow again"
    );
    assert_eq!(card.counters().interrupts_dropped, 2);
    assert_eq!(card.counters().buffers_corrupted, 1);
    let fault = std::iter::from_fn(|| card.pop_event()).find(|e| e.kind.get() == kind::FAULT);
    assert_eq!(fault.map(|e| e.arg0.get()), Some(9));
}

#[test]
fn scenario_stall_starves_the_buffers_and_overruns_the_fifo() {
    let mut card = card(settings(), 64);
    card.set_scenario(
        scenario::Scenario::parse("[[step]]\nat_ms = 10\naction = \"stall\"\nduration_ms = 100\n")
            .expect("valid scenario"),
    );
    let mut out = Vec::new();
    for _ in 0..8 {
        card.post(buffer(50), 0, &mut out);
    }
    card.start(0);
    card.advance(10 * MS, &mut out);
    let before = out.len();
    card.advance(100 * MS, &mut out);
    assert_eq!(out.len(), before, "nothing moves during the stall");
    assert!(
        card.counters().frames_dropped > 0,
        "the 64-frame FIFO overran"
    );
    card.advance(200 * MS, &mut out);
    assert!(out.len() > before, "data flows again after the stall");
    let c = card.counters();
    assert_eq!(
        c.frames_produced,
        c.frames_delivered + c.frames_dropped + card.frames_pending()
    );
}

/// Runs a deterministic card with a scenario, posting `posts` buffers of `frames` frames in
/// batches of `batch` (different batching = different host timing), and returns every
/// completed buffer's bytes.
fn deterministic_stream(batch: usize, posts: usize, frames: usize) -> Vec<Vec<u8>> {
    let mut card = card(settings(), 256);
    card.set_deterministic(true);
    card.set_scenario(
        scenario::Scenario::parse(
            "[[step]]\nat_ms = 300\naction = \"stall\"\nduration_ms = 50\n\
             [[step]]\nat_frame = 777\naction = \"trigger\"\n",
        )
        .expect("valid"),
    );
    let mut out = Vec::new();
    card.start(12_345); // real time is irrelevant in deterministic mode
    let mut posted = 0;
    let mut now = 0;
    while posted < posts {
        for _ in 0..batch.min(posts - posted) {
            card.post(buffer(frames), now, &mut out);
            posted += 1;
        }
        now += 7_000_000;
        card.advance(now, &mut out);
    }
    card.stop(now, &mut out);
    card.flush(now, &mut out);
    out.into_iter()
        .map(|c| c.buffer.bytes[..c.used_len as usize].to_vec())
        .collect()
}

#[test]
fn deterministic_mode_gives_the_same_stream_whatever_the_timing() {
    let a = deterministic_stream(1, 40, 100);
    let b = deterministic_stream(7, 40, 100);
    assert_eq!(a.len(), 40);
    assert_eq!(a, b, "bit-identical, timestamps and drops included");
    let headers: Vec<BufferHeader> = a
        .iter()
        .map(|bytes| BufferHeader::read_from_bytes(&bytes[..HEADER_SIZE]).expect("header"))
        .collect();
    // 1 kHz: the stall at 300 ms covers frames 300..350; the 256-frame FIFO absorbs them all.
    let dropped: u64 = headers.iter().map(|h| h.dropped_frames.get()).sum();
    assert_eq!(dropped, 0);
    assert_eq!(
        headers[3].timestamp_ns.get(),
        300 * MS,
        "virtual time: frame 300 at 300 ms"
    );
    let triggered = headers
        .iter()
        .find(|h| h.flags.get() & flags::TRIGGERED != 0)
        .expect("the trigger fired");
    assert_eq!(
        triggered.first_frame.get() + u64::from(triggered.trigger_frame.get()),
        777
    );
}

#[test]
fn deterministic_stall_longer_than_the_fifo_drops_exactly_the_overflow() {
    let mut card = card(settings(), 100);
    card.set_deterministic(true);
    card.set_scenario(
        scenario::Scenario::parse(
            "[[step]]\nat_frame = 50\naction = \"stall\"\nduration_ms = 400\n",
        )
        .expect("valid"),
    );
    let mut out = Vec::new();
    card.start(0);
    for _ in 0..10 {
        card.post(buffer(100), 0, &mut out);
    }
    card.advance(1, &mut out);
    // Stall: frames 50..450 sampled undrained; the FIFO keeps 100, 300 are dropped.
    assert_eq!(card.counters().frames_dropped, 300);
    let c = card.counters();
    assert_eq!(
        c.frames_produced,
        c.frames_delivered + c.frames_dropped + card.frames_pending()
    );
}

#[test]
fn deterministic_stream_with_a_long_stall_verifies() {
    let mut card = card(
        Settings {
            rate_hz: 1_000_000,
            channels: 4,
            format: SampleFormat::S16,
            ..settings()
        },
        65_536,
    );
    card.set_deterministic(true);
    card.set_scenario(
        scenario::Scenario::parse(
            "[[step]]\nat_ms = 100\naction = \"stall\"\nduration_ms = 100\n\
             [[step]]\nat_frame = 200000\naction = \"fault\"\ncode = 7\n",
        )
        .expect("valid"),
    );
    let mut verifier = vdaq_wire::check::StreamVerifier::new(SampleFormat::S16, 4, true);
    let mut out = Vec::new();
    card.start(0);
    let bytes = 65_536;
    for _ in 0..64 {
        card.post(VecBuffer::new(bytes), 0, &mut out);
    }
    let mut now = 0;
    while verifier.stats().frames < 400_000 {
        now += MS;
        card.advance(now, &mut out);
        for completion in out.drain(..) {
            verifier
                .check(&completion.buffer.bytes, completion.used_len as usize)
                .unwrap_or_else(|e| panic!("{e:?} in {:?}", completion.buffer.header()));
            card.post(VecBuffer::new(bytes), now, &mut Vec::new());
        }
    }
    assert!(verifier.stats().dropped_frames > 0);
}

#[test]
fn drops_before_an_unwritable_buffer_are_reported_in_the_next_header() {
    let mut card = card(settings(), 10);
    let mut out = Vec::new();
    card.start(0);
    card.advance(30 * MS, &mut out); // FIFO keeps 0..10, 10..30 dropped
    let mut bad = buffer(100);
    bad.fail_writes = true;
    card.post(buffer(10), 30 * MS, &mut out);
    card.advance(30 * MS, &mut out); // frames 0..10 delivered
    card.post(bad, 30 * MS, &mut out);
    card.advance(40 * MS, &mut out); // 30..40 into the unwritable buffer: lost
    card.post(buffer(100), 40 * MS, &mut out);
    card.flush(40 * MS, &mut out);
    let last = out.last().expect("completion").buffer.header();
    assert_eq!(last.first_frame.get(), 40);
    assert_eq!(
        last.dropped_frames.get(),
        30,
        "20 overrun + 10 lost with the bad buffer"
    );
    let c = card.counters();
    assert_eq!(c.frames_dropped, 30);
    assert_eq!(
        c.frames_produced,
        c.frames_delivered + c.frames_dropped + card.frames_pending()
    );
}

#[test]
fn edge_and_level_triggers_flag_buffers_and_raise_events() {
    use vdaq_wire::control::{trigger_mode, TriggerConfig};
    // A 10 kHz square wave at the free-running clock's nominal 1 MHz: +1 on frames 0..50,
    // −1 on 50..100, +1 from 100 …
    let mut card = card(
        Settings {
            signal: SignalKind::Square,
            signal_freq_mhz: 10_000_000,
            clock: ClockMode::FreeRunning,
            ..settings()
        },
        1024,
    );
    let mut out = Vec::new();
    let rising = TriggerConfig {
        mode: trigger_mode::RISING,
        reserved: 0,
        channel: 0.into(),
        threshold_ppm: 0.into(),
        pre_frames: 0.into(),
        post_frames: 20.into(),
    };
    assert_eq!(
        card.execute(opcode::SET_TRIGGER, rising.as_bytes(), 0, &mut out)
            .status,
        CommandStatus::Unsupported,
        "needs the trigger feature"
    );
    card.set_trigger_enabled(true);
    for bad in [
        TriggerConfig {
            channel: 5.into(),
            ..rising
        },
        // spec: [6.10-1] no pre-trigger history: a window reaching back is refused.
        TriggerConfig {
            pre_frames: 10.into(),
            ..rising
        },
    ] {
        assert_eq!(
            card.execute(opcode::SET_TRIGGER, bad.as_bytes(), 0, &mut out)
                .status,
            CommandStatus::Invalid
        );
    }
    assert_eq!(
        card.execute(opcode::SET_TRIGGER, rising.as_bytes(), 0, &mut out)
            .status,
        CommandStatus::Ok
    );
    card.start(0);
    for _ in 0..3 {
        card.post(buffer(80), 0, &mut out);
    }
    card.advance(0, &mut out);
    let headers: Vec<BufferHeader> = out.iter().map(|c| c.buffer.header()).collect();
    // Rising edges at frames 100 and 200: in buffers 1 (80..160) and 2 (160..240).
    assert_eq!(headers[0].flags.get() & flags::TRIGGERED, 0);
    assert_ne!(headers[1].flags.get() & flags::TRIGGERED, 0);
    assert_eq!(headers[1].trigger_frame.get(), 20);
    assert_eq!(headers[2].trigger_frame.get(), 40);
    let fired: Vec<u64> = std::iter::from_fn(|| card.pop_event())
        .filter(|e| e.kind.get() == kind::TRIGGER)
        .map(|e| e.arg0.get())
        .collect();
    assert_eq!(fired, vec![100, 200]);
    // A level trigger fires on the first frame at or below −0.5, then re-arms after the
    // post-trigger window.
    let below = TriggerConfig {
        mode: trigger_mode::LEVEL_BELOW,
        threshold_ppm: (-500_000i32 as u32).into(),
        post_frames: 30.into(),
        ..rising
    };
    assert_eq!(card.set_trigger(&below), CommandStatus::Ok);
    card.post(buffer(80), 0, &mut out);
    card.advance(0, &mut out);
    let fired: Vec<u64> = std::iter::from_fn(|| card.pop_event())
        .filter(|e| e.kind.get() == kind::TRIGGER)
        .map(|e| e.arg0.get())
        .collect();
    // Buffer 240..320: −1 on 250..300 → fires at 250 and again at 280 (re-armed after 30).
    assert_eq!(fired, vec![250, 280]);
}

#[test]
fn set_signal_mid_stream_ends_the_buffer_and_flags_the_next_one() {
    let mut card = card(
        Settings {
            clock: ClockMode::FreeRunning,
            ..settings()
        },
        1024,
    );
    card.set_scenario(
        scenario::Scenario::parse(
            "[[step]]\nat_frame = 150\naction = \"set_signal\"\nsignal = \"square\"\nfreq_hz = 1000\n",
        )
        .expect("valid"),
    );
    let mut out = Vec::new();
    card.start(0);
    for _ in 0..4 {
        card.post(buffer(100), 0, &mut out);
    }
    // Buffer 0: frames 0..100. The step fires once frame 100 is reached, at the next frame
    // sampled: buffer 1 (from 100) is counter up to there.
    card.advance(0, &mut out);
    let headers: Vec<BufferHeader> = out.iter().map(|c| c.buffer.header()).collect();
    let change = headers
        .iter()
        .position(|h| h.flags.get() & flags::DISCONTINUITY != 0)
        .expect("a buffer starts with the new signal");
    let before = &out[change - 1];
    let before_header = headers[change - 1];
    assert_eq!(
        vdaq_wire::pattern::verify_counter(
            SampleFormat::S32,
            before_header.first_frame.get() * 2,
            before.buffer.payload()
        ),
        None,
        "frames before the change are still the counter"
    );
    let first_changed = headers[change].first_frame.get();
    assert_eq!(
        first_changed,
        before_header.first_frame.get() + u64::from(before_header.frame_count.get()),
        "contiguous"
    );
    assert!(before_header.frame_count.get() < 100, "ended early");
    assert_eq!(
        before_header.flags.get(),
        flags::SIGNAL_CHANGED,
        "a buffer ended by the change says so"
    );
    let payload = out[change].buffer.payload();
    let sample = i32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
    assert!(
        sample.unsigned_abs() > 1 << 30,
        "a full-scale square sample, got {sample}"
    );
    assert_eq!(card.settings().signal, SignalKind::Square);
    let c = card.counters();
    assert_eq!(
        c.frames_produced,
        c.frames_delivered + c.frames_dropped + card.frames_pending()
    );
}
