use super::*;
use vdaq_wire::buffer::{flags, status as buffer_status, HEADER_SIZE};
use vdaq_wire::control::{opcode, CommandStatus, Configure, Status};
use vdaq_wire::event::{kind, EVENT_BACKLOG};
use vdaq_wire::pattern::verify_counter;
use vdaq_wire::zerocopy::{FromBytes, IntoBytes};
use vdaq_wire::{ClockMode, SampleFormat, SignalKind};

/// A read buffer in plain memory; can be told to fail writes (all of them, or the header's).
#[derive(Debug)]
struct VecBuffer {
    bytes: Vec<u8>,
    fail_writes: bool,
    fail_header: bool,
}

impl VecBuffer {
    fn new(total: usize) -> Self {
        VecBuffer {
            bytes: vec![0xaa; total],
            fail_writes: false,
            fail_header: false,
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
        if self.fail_writes || self.fail_header || self.bytes.len() < HEADER_SIZE {
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

/// spec: [6.3-4] [6.5-3] a full FIFO keeps its oldest frames (0..100) and drops the newest;
/// the first buffer after the gap reports all 150 in `dropped_frames`.
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

/// spec: [6.6-3] a buffer ended by the latency bound says LATENCY.
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

/// spec: [6.6-3] buffers ended by FLUSH, partly filled or empty, say FLUSHED.
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

/// spec: [6.6-3] a buffer ended by STOP says STOPPED.
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

/// spec: [6.7-1] with coalescing, the notification point comes `latency_us` after a completion
/// at the latest.
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

/// spec: [7-1] 64 ≤ writable area < 64 + frame size: BAD_BUFFER header, used length 64, counted.
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

/// spec: [6.3-4] [7-1] a buffer that cannot be written comes back with used length 0, counted;
/// its frames count as dropped and show up in the next header.
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
    assert_eq!(c.requests_rejected, 1, "counted");
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

/// spec: [6.6-3] a buffer left partly filled when the FIFO empties while stopped says STOPPED.
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

/// spec: [6.2-2] [6.6-3] frames of two clock runs never share a buffer: the first ends at the
/// pause and says PAUSED.
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

/// spec: [6.2-4] [7-1] CONFIGURE that changes the frame size returns every held buffer, in
/// order, empty and FLUSHED, without counting them as rejected.
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
    assert_eq!(card.counters().requests_rejected, 0, "not counted");
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

/// spec: [6.3-4] an empty FLUSHED buffer reports the frames lost since the last delivered one.
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

/// spec: [6.3-4] frames lost to overrun and with an unwritable buffer both show up in the
/// next header.
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

/// spec: [6.10-1] SET_TRIGGER is INVALID for an unknown mode, a channel ≥ `channels`, a
/// threshold beyond ±1 000 000, `post_frames` 0 or `pre_frames` other than 0.
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
        TriggerConfig { mode: 5, ..rising },
        TriggerConfig {
            channel: 2.into(),
            ..rising
        },
        TriggerConfig {
            threshold_ppm: 1_000_001.into(),
            ..rising
        },
        TriggerConfig {
            threshold_ppm: (-1_000_001i32 as u32).into(),
            ..rising
        },
        TriggerConfig {
            post_frames: 0.into(),
            ..rising
        },
        // No pre-trigger history: a window reaching back is refused.
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

/// spec: [6.2-2] [6.6-3] frames of two signals never share a buffer: the first ends at the change
/// and says SIGNAL_CHANGED.
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

/// The counters as a driver reads them in a GET_STATUS reply.
fn status_reply(card: &mut Card<VecBuffer>, now: u64) -> Status {
    let reply = card.execute(opcode::GET_STATUS, &[], now, &mut Vec::new());
    assert_eq!(reply.status, CommandStatus::Ok);
    Status::read_from_bytes(&reply.payload).expect("status payload")
}

/// Fails unless produced = delivered + dropped + pending, in a GET_STATUS reply and in the
/// configuration space.
fn assert_every_frame_accounted(card: &mut Card<VecBuffer>, now: u64, step: &str) {
    let status = status_reply(card, now);
    assert_eq!(
        status.frames_produced.get(),
        status.frames_delivered.get() + status.frames_dropped.get() + status.frames_pending.get(),
        "GET_STATUS after {step}: {status:?}"
    );
    let config = card.config_space();
    assert_eq!(
        config.frames_produced.get(),
        config.frames_delivered.get() + config.frames_dropped.get() + card.frames_pending(),
        "configuration space after {step}"
    );
}

/// spec: [6.1-1] paced buffers carry the nominal sampling time of their first frame (after
/// an overrun gap and in a second clock run too), and those times never go back.
#[test]
fn paced_buffers_carry_the_nominal_time_of_their_first_frame() {
    // 3 kHz: 10⁹ / 3000 ns is not a whole number, so only the formula gives these times.
    let mut card = card(
        Settings {
            rate_hz: 3000,
            ..settings()
        },
        64,
    );
    let mut out = Vec::new();
    let t0 = 7 * MS + 123;
    card.start(t0);
    for _ in 0..4 {
        card.post(buffer(7), t0, &mut out);
    }
    card.advance(t0 + 20 * MS, &mut out); // frames 0..60: 28 into buffers, 32 in the FIFO
    card.advance(t0 + 50 * MS, &mut out); // the FIFO fills up to frame 92, 92..150 dropped
    for _ in 0..20 {
        card.post(buffer(7), t0 + 50 * MS, &mut out);
    }
    card.advance(t0 + 60 * MS, &mut out); // written now, sampled from t0 + 50 ms on
    card.stop(t0 + 60 * MS, &mut out);
    let second_run = card.counters().frames_produced; // stream index at the next START
    let t1 = t0 + 1000 * MS + 17;
    card.start(t1);
    card.advance(t1 + 10 * MS, &mut out);
    card.flush(t1 + 10 * MS, &mut out);
    let nominal = |first: u64| {
        let (origin, s0) = if first < second_run {
            (t0, 0)
        } else {
            (t1, second_run)
        };
        origin + (u128::from(first - s0) * 1_000_000_000 / 3000) as u64
    };
    let with_frames: Vec<BufferHeader> = out
        .iter()
        .map(verified)
        .filter(|h| h.frame_count.get() > 0)
        .collect();
    assert!(with_frames.iter().any(|h| h.first_frame.get() == 150));
    assert!(with_frames
        .iter()
        .any(|h| h.first_frame.get() >= second_run));
    for header in &with_frames {
        assert_eq!(
            header.timestamp_ns.get(),
            nominal(header.first_frame.get()),
            "buffer from frame {}",
            header.first_frame.get()
        );
    }
    for pair in with_frames.windows(2) {
        assert!(pair[1].timestamp_ns.get() >= pair[0].timestamp_ns.get());
    }
}

/// spec: [6.1-2] [6.12-1] every frame produced is delivered, dropped or pending, in
/// GET_STATUS and the configuration space, through overruns, lost buffers, STOP, FLUSH,
/// RESET_COUNTERS and a restart.
#[test]
fn every_frame_produced_is_delivered_dropped_or_pending_at_every_step() {
    let mut card = card(settings(), 16);
    let mut out = Vec::new();
    assert_every_frame_accounted(&mut card, 0, "power-on");
    card.start(0);
    card.advance(50 * MS, &mut out);
    assert_every_frame_accounted(&mut card, 50 * MS, "an overrun");
    card.post(buffer(10), 50 * MS, &mut out);
    card.post(buffer(100), 50 * MS, &mut out);
    card.advance(55 * MS, &mut out);
    assert_every_frame_accounted(&mut card, 55 * MS, "a full and a partly filled buffer");
    card.flush(55 * MS, &mut out);
    let mut unwritable = buffer(10);
    unwritable.fail_writes = true;
    card.post(unwritable, 55 * MS, &mut out);
    card.advance(70 * MS, &mut out);
    assert_every_frame_accounted(&mut card, 70 * MS, "a buffer that could not be written");
    let mut headerless = buffer(10);
    headerless.fail_header = true;
    card.post(headerless, 70 * MS, &mut out);
    card.advance(80 * MS, &mut out);
    assert_every_frame_accounted(&mut card, 80 * MS, "a header that could not be written");
    card.post(buffer(100), 80 * MS, &mut out);
    card.advance(85 * MS, &mut out);
    card.stop(90 * MS, &mut out);
    assert_every_frame_accounted(&mut card, 90 * MS, "STOP");
    card.start(100 * MS);
    card.advance(130 * MS, &mut out);
    let c = card.counters();
    assert!(c.frames_dropped > 0 && c.frames_delivered > 0, "{c:?}");
    card.execute(opcode::RESET_COUNTERS, &[], 130 * MS, &mut out);
    assert_every_frame_accounted(&mut card, 130 * MS, "RESET_COUNTERS with frames pending");
    card.post(buffer(100), 130 * MS, &mut out);
    card.advance(140 * MS, &mut out);
    card.flush(140 * MS, &mut out);
    assert_every_frame_accounted(&mut card, 140 * MS, "FLUSH");
}

/// spec: [6.2-2] [6.6-3] frames after an overrun gap never join the buffer before it: that
/// buffer ends as it is, with no reason flag, and the next one starts after the gap.
#[test]
fn an_overrun_gap_ends_the_buffer_without_a_reason_flag() {
    let mut card = card(settings(), 100);
    let mut out = Vec::new();
    card.start(0);
    card.advance(250 * MS, &mut out); // the FIFO keeps 0..100, 100..250 are dropped
    card.post(buffer(150), 250 * MS, &mut out);
    card.post(buffer(150), 250 * MS, &mut out);
    card.advance(260 * MS, &mut out);
    assert_eq!(out.len(), 1);
    let before = verified(&out[0]);
    assert_eq!(
        (before.first_frame.get(), before.frame_count.get()),
        (0, 100),
        "room for 150, ended at the gap"
    );
    assert_eq!(before.flags.get(), 0, "a gap adds no reason flag");
    card.flush(260 * MS, &mut out);
    let after = verified(&out[1]);
    assert_eq!(after.first_frame.get(), 250);
    assert_eq!(after.frame_count.get(), 10);
}

/// spec: [6.2-3] the used length is 64 + frame_count × frame size for every buffer whose
/// header was written (full, partly filled, empty, BAD_BUFFER), and 0 for one that could not
/// be written.
#[test]
fn used_length_is_the_header_plus_the_frames_or_zero_when_unwritable() {
    let frame = 2 * 4; // 2 × S32
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    let mut unwritable = buffer(10);
    unwritable.fail_writes = true;
    let mut headerless = buffer(10);
    headerless.fail_header = true;
    card.post(VecBuffer::new(HEADER_SIZE + 7), 0, &mut out); // BAD_BUFFER
    card.post(buffer(10), 0, &mut out); // full
    card.post(unwritable, 0, &mut out);
    card.post(headerless, 0, &mut out);
    card.post(buffer(100), 0, &mut out); // partly filled at STOP
    card.start(0);
    card.advance(42 * MS, &mut out);
    card.stop(42 * MS, &mut out);
    card.post(buffer(10), 42 * MS, &mut out); // empty at FLUSH
    card.flush(42 * MS, &mut out);
    let used: Vec<u32> = out.iter().map(|c| c.used_len).collect();
    assert_eq!(used.len(), 6);
    assert_eq!(
        used[2..4],
        [0, 0],
        "the two buffers that could not be written"
    );
    for completion in out.iter().filter(|c| c.used_len != 0) {
        let header = completion.buffer.header();
        assert_eq!(
            completion.used_len as usize,
            HEADER_SIZE + header.frame_count.get() as usize * frame,
            "{header:?}"
        );
    }
    let frames: Vec<u32> = [0, 1, 4, 5]
        .iter()
        .map(|&i| out[i].buffer.header().frame_count.get())
        .collect();
    assert_eq!(frames, [0, 10, 12, 0]);
}

/// spec: [6.2-5] a buffer gets only the whole frames that fit in its payload area; the bytes
/// after them are not written.
#[test]
fn a_buffer_gets_only_the_frames_that_fit_and_its_trailing_bytes_stay_untouched() {
    let frame = 3 * 2; // 3 × S16
    let mut card = card(
        Settings {
            channels: 3,
            format: SampleFormat::S16,
            clock: ClockMode::FreeRunning,
            ..settings()
        },
        1024,
    );
    let mut out = Vec::new();
    card.start(0);
    for (frames, trailing) in [(1, 5), (5, 1), (17, 3), (4, 0)] {
        card.post(
            VecBuffer::new(HEADER_SIZE + frames * frame + trailing),
            0,
            &mut out,
        );
    }
    card.advance(0, &mut out);
    assert_eq!(out.len(), 4);
    for (completion, (frames, trailing)) in out.iter().zip([(1, 5), (5, 1), (17, 3), (4, 0)]) {
        let header = completion.buffer.header();
        assert_eq!(header.frame_count.get() as usize, frames);
        let end = HEADER_SIZE + frames * frame;
        assert_eq!(completion.buffer.bytes[end..], vec![0xaa; trailing]);
    }
}

/// spec: [6.3-1] reserved header fields and flag bits are zero in every kind of completion
/// (buffers start out filled with 0xaa).
#[test]
fn reserved_header_fields_and_flag_bits_are_written_as_zero() {
    let mut card = card(
        Settings {
            latency_us: 20_000,
            ..settings()
        },
        50,
    );
    card.set_crc_enabled(true);
    card.set_trigger_enabled(true);
    let mut out = Vec::new();
    card.post(VecBuffer::new(HEADER_SIZE + 3), 0, &mut out); // BAD_BUFFER
    card.trigger();
    card.start(0);
    card.post(buffer(10), 0, &mut out); // full, TRIGGERED
    card.post(buffer(100), 0, &mut out); // LATENCY
    card.advance(40 * MS, &mut out);
    card.advance(200 * MS, &mut out); // overrun
    card.post(buffer(200), 200 * MS, &mut out); // ended by the gap
    card.post(buffer(200), 200 * MS, &mut out); // OVERRUN, STOPPED
    card.advance(210 * MS, &mut out);
    card.stop(210 * MS, &mut out);
    card.post(buffer(10), 210 * MS, &mut out);
    card.flush(210 * MS, &mut out); // empty, FLUSHED
    let wider = Settings {
        channels: 4,
        ..*card.settings()
    };
    assert_eq!(card.configure(wider, 210 * MS, &mut out), CommandStatus::Ok);
    card.start(300 * MS);
    card.post(buffer(100), 300 * MS, &mut out); // DISCONTINUITY
    card.advance(310 * MS, &mut out);
    card.flush(310 * MS, &mut out);
    let mut seen = 0;
    for completion in &out {
        let header = completion.buffer.header();
        assert_eq!(header.reserved0, 0, "{header:?}");
        assert_eq!(header.reserved1.get(), 0, "{header:?}");
        assert_eq!(header.flags.get() & !flags::ALL, 0, "{header:?}");
        seen |= header.flags.get();
    }
    let expected = flags::TRIGGERED
        | flags::LATENCY
        | flags::OVERRUN
        | flags::STOPPED
        | flags::FLUSHED
        | flags::CRC_VALID
        | flags::DISCONTINUITY;
    assert_eq!(seen & expected, expected, "every kind was seen: {seen:#x}");
    assert!(out
        .iter()
        .any(|c| c.buffer.header().status == buffer_status::BAD_BUFFER));
}

/// spec: [6.3-2] OVERRUN is set exactly on the buffers whose `dropped_frames` is not 0.
#[test]
fn overrun_is_flagged_exactly_when_frames_were_dropped_before_the_buffer() {
    let mut card = card(settings(), 10);
    let mut out = Vec::new();
    card.start(0);
    for i in 1..=40u64 {
        let now = i * 7 * MS;
        card.advance(now, &mut out);
        if i % 3 != 0 {
            card.post(buffer(if i % 2 == 0 { 8 } else { 20 }), now, &mut out);
        }
        if i % 5 == 0 {
            let mut unwritable = buffer(4);
            unwritable.fail_writes = true;
            card.post(unwritable, now, &mut out);
        }
        if i % 11 == 0 {
            card.flush(now, &mut out);
        }
        card.advance(now, &mut out);
    }
    card.flush(41 * 7 * MS, &mut out);
    let headers: Vec<BufferHeader> = out
        .iter()
        .filter(|c| c.used_len != 0)
        .map(|c| c.buffer.header())
        .collect();
    for header in &headers {
        assert_eq!(
            header.flags.get() & flags::OVERRUN != 0,
            header.dropped_frames.get() > 0,
            "{header:?}"
        );
    }
    let overruns = headers
        .iter()
        .filter(|h| h.dropped_frames.get() > 0)
        .count();
    assert!(overruns > 0 && overruns < headers.len(), "both kinds seen");
}

/// spec: [6.3-3] OK buffers (empty ones too) are numbered 0, 1, 2, … from reset; BAD_BUFFER
/// answers and used-length-0 returns take no number.
#[test]
fn sequence_numbers_count_ok_buffers_only_and_start_at_zero_after_reset() {
    let mut card = card(
        Settings {
            clock: ClockMode::FreeRunning,
            ..settings()
        },
        1024,
    );
    let mut out = Vec::new();
    let mut unwritable = buffer(10);
    unwritable.fail_writes = true;
    let mut headerless = buffer(10);
    headerless.fail_header = true;
    card.start(0);
    card.post(buffer(10), 0, &mut out);
    card.post(VecBuffer::new(HEADER_SIZE + 7), 0, &mut out);
    card.post(buffer(10), 0, &mut out);
    card.post(unwritable, 0, &mut out);
    card.post(buffer(10), 0, &mut out);
    card.post(headerless, 0, &mut out);
    card.post(buffer(10), 0, &mut out);
    card.advance(0, &mut out);
    card.stop(0, &mut out);
    card.post(buffer(10), 0, &mut out);
    card.flush(0, &mut out);
    let sequences: Vec<u64> = out
        .iter()
        .filter(|c| c.used_len != 0 && c.buffer.header().status == buffer_status::OK)
        .map(|c| c.buffer.header().sequence.get())
        .collect();
    assert_eq!(sequences, [0, 1, 2, 3, 4]);
    assert_eq!(
        out.len(),
        8,
        "a BAD_BUFFER and two used-length-0 returns besides"
    );
    card.reset();
    let mut out = Vec::new();
    card.start(0);
    card.post(buffer(10), 0, &mut out);
    card.advance(0, &mut out);
    assert_eq!(verified(&out[0]).sequence.get(), 0, "from 0 after reset");
}

/// spec: [6.4-1] COUNTER: sample n = frame × channels + channel carries n mod 2¹⁶ (S16),
/// n mod 2³² (S32) or (float)(n mod 2²⁴) (F32), here across each format's wrap-around.
#[test]
fn counter_samples_carry_their_sample_number_in_every_format() {
    let channels = 3u64;
    for (format, wrap) in [
        (SampleFormat::S16, 1u64 << 16),
        (SampleFormat::S32, 1 << 32),
        (SampleFormat::F32, 1 << 24),
    ] {
        let size = format.sample_bytes();
        // 100 MHz into a 16-frame FIFO: frames drop cheaply until the stream is near the wrap.
        let mut card = card(
            Settings {
                rate_hz: 100_000_000,
                channels: channels as u16,
                format,
                ..settings()
            },
            16,
        );
        let mut out = Vec::new();
        let first = wrap / channels - 10;
        let t1 = first * 10; // frame f is due at f × 10 ns
        card.start(0);
        card.advance(t1, &mut out); // frames 0..16 in the FIFO, the rest up to `first` dropped
        card.post(VecBuffer::new(HEADER_SIZE + 16 * 3 * size), t1, &mut out);
        card.advance(t1, &mut out);
        card.post(VecBuffer::new(HEADER_SIZE + 64 * 3 * size), t1, &mut out);
        card.advance(t1 + 1000, &mut out);
        assert_eq!(out.len(), 2, "{format:?}");
        let header = out[1].buffer.header();
        assert_eq!(header.first_frame.get(), first);
        for (completion, from) in out.iter().zip([0, first]) {
            for (i, sample) in completion.buffer.payload().chunks(size).enumerate() {
                let n = from * channels + i as u64;
                let expected = match format {
                    SampleFormat::S16 => (n as u16).to_le_bytes().to_vec(),
                    SampleFormat::S32 => (n as u32).to_le_bytes().to_vec(),
                    SampleFormat::F32 => ((n % (1 << 24)) as f32).to_le_bytes().to_vec(),
                };
                assert_eq!(sample, expected, "{format:?} sample {n}");
            }
        }
    }
}

/// spec: [6.4-2] CONFIGURE to the FILE signal is INVALID without a source, or with a source
/// of another channel count, and applied with a matching one.
#[test]
fn file_signal_needs_a_source_with_as_many_channels() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    let file = Settings {
        signal: SignalKind::File,
        ..settings()
    }
    .to_wire();
    let mut configure = |card: &mut Card<VecBuffer>| {
        card.execute(opcode::CONFIGURE, file.as_bytes(), 0, &mut out)
            .status
    };
    assert_eq!(configure(&mut card), CommandStatus::Invalid, "no source");
    card.set_source(std::sync::Arc::new(source::FileSource {
        channels: 3,
        samples: vec![0.0; 6],
    }));
    assert_eq!(
        configure(&mut card),
        CommandStatus::Invalid,
        "3 channels, not 2"
    );
    assert_eq!(card.settings().signal, SignalKind::Counter);
    card.set_source(std::sync::Arc::new(source::FileSource {
        channels: 2,
        samples: vec![0.5, -0.5],
    }));
    assert_eq!(configure(&mut card), CommandStatus::Ok);
    assert_eq!(card.settings().signal, SignalKind::File);
}

/// spec: [6.5-1] a partly filled front buffer completes with LATENCY at the first tick at or
/// after `latency_us` past its first frame's sampling time, and not a tick earlier.
#[test]
fn latency_bound_completes_the_front_buffer_at_the_first_tick_past_its_deadline() {
    let mut card = card(
        Settings {
            latency_us: 20_000,
            ..settings()
        },
        1024,
    );
    let mut out = Vec::new();
    let t0 = 1000 * MS;
    card.start(t0);
    let tick = |card: &mut Card<VecBuffer>, ms: u64, out: &mut Vec<_>| {
        card.advance(t0 + ms * MS, out);
    };
    for ms in 1..=5 {
        tick(&mut card, ms, &mut out);
    }
    // Frame 0 (sampled at t0) waited in the FIFO; the buffer posted now takes it.
    card.post(buffer(1000), t0 + 5 * MS, &mut out);
    for ms in 6..20 {
        tick(&mut card, ms, &mut out);
        assert!(out.is_empty(), "completed early, at {ms} ms");
    }
    tick(&mut card, 20, &mut out);
    assert_eq!(out.len(), 1, "due 20 ms after frame 0");
    let first = verified(&out[0]);
    assert_eq!(first.flags.get(), flags::LATENCY);
    assert_eq!((first.first_frame.get(), first.frame_count.get()), (0, 20));
    card.post(buffer(1000), t0 + 20 * MS, &mut out);
    for ms in 21..40 {
        tick(&mut card, ms, &mut out);
        assert_eq!(out.len(), 1, "completed early, at {ms} ms");
    }
    tick(&mut card, 40, &mut out);
    assert_eq!(out.len(), 2, "due 20 ms after frame 20");
    let second = verified(&out[1]);
    assert_eq!(second.flags.get(), flags::LATENCY);
    assert_eq!(second.first_frame.get(), 20);
    assert_eq!(second.timestamp_ns.get(), t0 + 20 * MS);
}

/// spec: [6.8-4] CONFIGURE applies every field or none (a single bad field leaves all the
/// settings as they were), and the stream index and `sequence` carry on across it.
#[test]
fn configure_applies_every_field_or_none_and_keeps_the_stream_position() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    card.post(buffer(10), 0, &mut out);
    card.post(buffer(10), 0, &mut out);
    card.start(0);
    card.advance(20 * MS, &mut out);
    card.stop(20 * MS, &mut out);
    assert_eq!(out.len(), 2);
    let before = *card.settings();
    let config_before = card.config_space();
    let new = Settings {
        rate_hz: 2000,
        channels: 3,
        format: SampleFormat::S16,
        signal: SignalKind::Sine,
        signal_freq_mhz: 5000,
        amplitude_permille: 500,
        seed: 9,
        clock: ClockMode::Paced,
        latency_us: 5000,
        watermark_frames: 4,
        coalesce_buffers: 2,
    };
    let good = new.to_wire();
    let bad: [Configure; 9] = [
        Configure {
            rate_hz: 0.into(),
            ..good
        },
        Configure {
            channels: 0.into(),
            ..good
        },
        Configure {
            latency_us: 0.into(),
            ..good
        },
        Configure {
            watermark_frames: 0.into(),
            ..good
        },
        Configure {
            coalesce_buffers: 0.into(),
            ..good
        },
        Configure {
            amplitude_permille: 1001.into(),
            ..good
        },
        Configure { format: 9, ..good },
        Configure { signal: 77, ..good },
        Configure { clock: 5, ..good },
    ];
    for configure in bad {
        assert_eq!(
            card.execute(opcode::CONFIGURE, configure.as_bytes(), 20 * MS, &mut out)
                .status,
            CommandStatus::Invalid,
            "{configure:?}"
        );
        assert_eq!(*card.settings(), before, "none applied: {configure:?}");
        assert_eq!(card.config_space(), config_before);
    }
    assert_eq!(
        card.execute(opcode::CONFIGURE, good.as_bytes(), 20 * MS, &mut out)
            .status,
        CommandStatus::Ok
    );
    assert_eq!(*card.settings(), new, "all applied");
    assert_eq!(card.config_space().signal_freq_mhz.get(), 5000);
    let mut out = Vec::new();
    card.post(VecBuffer::new(HEADER_SIZE + 10 * 6), 100 * MS, &mut out);
    card.start(100 * MS);
    card.advance(110 * MS, &mut out);
    let header = out[0].buffer.header();
    assert_eq!(header.first_frame.get(), 20, "the stream index carries on");
    assert_eq!(header.sequence.get(), 2, "and so does the sequence");
    assert_eq!(header.channels.get(), 3);
}

/// spec: [6.8-5] when several statuses apply, the first of the precedence list (5.x.6.8) wins: the pairs
/// the model decides (framing is the backend's).
#[test]
fn command_status_precedence_in_the_model() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    let mut run = |card: &mut Card<VecBuffer>, op: u32, payload: &[u8]| {
        card.execute(op, payload, 0, &mut out).status
    };
    let configure = settings().to_wire();
    let out_of_range = Configure {
        amplitude_permille: 1001.into(),
        ..configure
    };
    let unknown_code = Configure {
        format: 9,
        ..configure
    };
    let trigger = vdaq_wire::control::TriggerConfig {
        mode: 99,
        ..Default::default()
    };
    // Unknown opcode before a payload size; payload size before the feature.
    assert_eq!(run(&mut card, 99, &[1, 2, 3]), CommandStatus::Unsupported);
    assert_eq!(
        run(&mut card, opcode::TRIGGER, &[0]),
        CommandStatus::BadSize
    );
    // The feature before any field.
    assert_eq!(
        run(&mut card, opcode::SET_TRIGGER, trigger.as_bytes()),
        CommandStatus::Unsupported
    );
    card.start(0);
    // An unknown code before the state; the state before a value out of range.
    assert_eq!(
        run(&mut card, opcode::CONFIGURE, unknown_code.as_bytes()),
        CommandStatus::Invalid
    );
    assert_eq!(
        run(&mut card, opcode::CONFIGURE, out_of_range.as_bytes()),
        CommandStatus::Busy
    );
    card.enter_needs_reset(vdaq_wire::event::fault::QUEUE_CORRUPT, 0);
    // Unknown opcode and payload size before NEEDS_RESET; NEEDS_RESET before the rest.
    assert_eq!(run(&mut card, 99, &[]), CommandStatus::Unsupported);
    assert_eq!(run(&mut card, opcode::START, &[0]), CommandStatus::BadSize);
    assert_eq!(run(&mut card, opcode::TRIGGER, &[]), CommandStatus::Busy);
    assert_eq!(
        run(&mut card, opcode::CONFIGURE, unknown_code.as_bytes()),
        CommandStatus::Busy
    );
}

/// spec: [6.8-6] RESET_COUNTERS zeroes delivered, dropped, buffers_completed,
/// requests_rejected and events_lost, sets produced to the frames pending, and keeps the
/// stream index and `sequence`.
#[test]
fn reset_counters_zeroes_the_counters_and_keeps_the_stream_position() {
    let mut card = card(settings(), 16);
    let mut out = Vec::new();
    card.start(0);
    card.advance(100 * MS, &mut out); // the FIFO keeps 0..16, 16..100 dropped
    card.post(buffer(10), 100 * MS, &mut out);
    card.advance(100 * MS, &mut out); // 0..10 delivered
    card.post(buffer(10), 100 * MS, &mut out);
    card.advance(100 * MS, &mut out); // 10..16 pending in the front buffer
    card.post(VecBuffer::new(HEADER_SIZE + 1), 100 * MS, &mut out); // rejected
    for code in 0..70 {
        card.apply(scenario::Action::Fault(code), 100 * MS); // the backlog overflows
    }
    let c = card.counters();
    assert!(
        c.frames_delivered > 0
            && c.frames_dropped > 0
            && c.buffers_completed > 0
            && c.requests_rejected > 0
            && c.events_lost > 0,
        "{c:?}"
    );
    assert_eq!(card.frames_pending(), 6);
    assert_eq!(
        card.execute(opcode::RESET_COUNTERS, &[], 100 * MS, &mut out)
            .status,
        CommandStatus::Ok
    );
    let status = status_reply(&mut card, 100 * MS);
    assert_eq!(status.frames_produced.get(), 6, "the frames pending");
    assert_eq!(status.frames_pending.get(), 6);
    for counter in [
        status.frames_delivered,
        status.frames_dropped,
        status.buffers_completed,
        status.requests_rejected,
    ] {
        assert_eq!(counter.get(), 0, "{status:?}");
    }
    assert_eq!(card.config_space().events_lost.get(), 0);
    card.advance(104 * MS, &mut out); // frame 100 follows the gap: the front buffer ends
    let next = verified(out.last().expect("the front buffer completed"));
    assert_eq!(next.first_frame.get(), 10, "stream index kept");
    assert_eq!(next.sequence.get(), 1, "sequence kept");
    let c = card.counters();
    assert_eq!(
        c.frames_delivered, 6,
        "the frames pending at RESET_COUNTERS"
    );
    assert_eq!(
        c.frames_produced,
        c.frames_delivered + card.frames_pending()
    );
}

/// spec: [6.10-3] a second TRIGGER replaces the armed one: only the later trigger frame fires.
#[test]
fn a_trigger_command_replaces_the_armed_software_trigger() {
    let mut card = card(
        Settings {
            watermark_frames: 1000,
            ..settings()
        },
        1024,
    );
    card.set_trigger_enabled(true);
    let mut out = Vec::new();
    card.start(0);
    card.advance(5 * MS, &mut out); // frames 0..5 wait in the FIFO
    assert_eq!(
        card.execute(opcode::TRIGGER, &[], 5 * MS, &mut out).status,
        CommandStatus::Ok
    );
    card.advance(10 * MS, &mut out); // frame 5, the armed one, still in the FIFO
    assert_eq!(
        card.execute(opcode::TRIGGER, &[], 10 * MS, &mut out).status,
        CommandStatus::Ok
    );
    card.advance(20 * MS, &mut out);
    card.post(buffer(100), 20 * MS, &mut out);
    card.flush(20 * MS, &mut out);
    let header = verified(&out[0]);
    assert_eq!(header.frame_count.get(), 20);
    assert_ne!(header.flags.get() & flags::TRIGGERED, 0);
    assert_eq!(header.trigger_frame.get(), 10);
    let fired: Vec<u64> = std::iter::from_fn(|| card.pop_event())
        .filter(|e| e.kind.get() == kind::TRIGGER)
        .map(|e| e.arg0.get())
        .collect();
    assert_eq!(fired, [10], "frame 5's trigger was replaced");
}

/// spec: [6.13-2] reset returns the card to STOPPED with its power-on settings, counters at
/// 0, `fault_code` cleared, and the stream index and `sequence` starting over at 0.
#[test]
fn reset_returns_to_power_on_settings_with_counters_and_stream_at_zero() {
    let mut card = card(settings(), 16);
    let mut out = Vec::new();
    let other = Settings {
        channels: 3,
        rate_hz: 2000,
        ..settings()
    };
    assert_eq!(card.configure(other, 0, &mut out), CommandStatus::Ok);
    card.start(0);
    card.post(VecBuffer::new(HEADER_SIZE + 12 * 10), 0, &mut out);
    card.advance(100 * MS, &mut out);
    card.post(VecBuffer::new(HEADER_SIZE + 1), 100 * MS, &mut out);
    card.enter_needs_reset(vdaq_wire::event::fault::FIRMWARE, 100 * MS);
    assert_ne!(card.counters(), Counters::default());
    card.reset();
    assert_eq!(card.state(), DeviceState::Stopped);
    assert_eq!(*card.settings(), settings(), "power-on settings");
    assert_eq!(card.counters(), Counters::default());
    let config = card.config_space();
    assert_eq!(config.state, DeviceState::Stopped as u8);
    assert_eq!(config.fault_code.get(), 0);
    assert_eq!(config.channels.get(), settings().channels);
    assert_eq!(config.rate_hz.get(), settings().rate_hz);
    let mut out = Vec::new();
    card.start(200 * MS);
    card.post(buffer(10), 200 * MS, &mut out);
    card.advance(210 * MS, &mut out);
    let header = verified(&out[0]);
    assert_eq!(header.first_frame.get(), 0, "stream index from 0");
    assert_eq!(header.sequence.get(), 0, "sequence from 0");
}

/// spec: [6.13-4] in NEEDS_RESET every command but GET_STATUS is answered BUSY (and the
/// device stays there).
#[test]
fn needs_reset_answers_every_command_but_get_status_with_busy() {
    use vdaq_wire::control::{trigger_mode, Opcode, TriggerConfig};
    let mut card = card(settings(), 1024);
    card.set_trigger_enabled(true);
    let mut out = Vec::new();
    card.enter_needs_reset(vdaq_wire::event::fault::QUEUE_CORRUPT, 0);
    let configure = settings().to_wire();
    let trigger = TriggerConfig {
        mode: trigger_mode::RISING,
        post_frames: 1.into(),
        ..Default::default()
    };
    for op in Opcode::ALL {
        let payload: &[u8] = match op {
            Opcode::Configure => configure.as_bytes(),
            Opcode::SetTrigger => trigger.as_bytes(),
            _ => &[],
        };
        let status = card.execute(op.code(), payload, 0, &mut out).status;
        let expected = if op == Opcode::GetStatus {
            CommandStatus::Ok
        } else {
            CommandStatus::Busy
        };
        assert_eq!(status, expected, "{op:?}");
        assert_eq!(card.state(), DeviceState::NeedsReset);
    }
}

/// Events raised while the backlog is full are lost and counted, one by one; a reset
/// discards the backlog without counting it. (5.x.6.9; the label waits for TRIGGER events
/// beyond 64 in one buffer to be counted too.)
#[test]
fn events_beyond_the_backlog_are_counted_lost_and_a_reset_discards_the_rest() {
    let mut card = card(settings(), 1024);
    for code in 0..(EVENT_BACKLOG as u32 + 5) {
        card.apply(scenario::Action::Fault(code), 0);
    }
    assert_eq!(card.counters().events_lost, 5);
    let kept: Vec<u64> = std::iter::from_fn(|| card.pop_event())
        .map(|e| e.arg0.get())
        .collect();
    assert_eq!(
        kept,
        (0..EVENT_BACKLOG as u64).collect::<Vec<_>>(),
        "the oldest kept"
    );
    card.apply(scenario::Action::Fault(1), 0);
    card.reset();
    assert!(card.pop_event().is_none());
    assert_eq!(card.counters().events_lost, 0);
}

/// spec: [6.8-5] a value out of range is INVALID before pending frames make CONFIGURE BUSY.
#[test]
fn configure_with_a_value_out_of_range_is_invalid_even_with_frames_pending() {
    let mut card = card(settings(), 1024);
    let mut out = Vec::new();
    card.start(0);
    card.advance(10 * MS, &mut out);
    card.stop(10 * MS, &mut out); // no buffer posted: 10 frames stay pending in the FIFO
    assert!(card.frames_pending() > 0);
    let bad = Configure {
        amplitude_permille: 1001.into(),
        ..settings().to_wire()
    };
    assert_eq!(
        card.execute(opcode::CONFIGURE, bad.as_bytes(), 10 * MS, &mut out)
            .status,
        CommandStatus::Invalid
    );
    let changed = Configure {
        amplitude_permille: 500.into(),
        ..settings().to_wire()
    };
    assert_eq!(
        card.execute(opcode::CONFIGURE, changed.as_bytes(), 10 * MS, &mut out)
            .status,
        CommandStatus::Busy,
        "a valid change waits for the pending frames"
    );
}

/// spec: [6.10-2] one TRIGGER event per trigger that fires; [6.9-2] every event lost counted.
#[test]
fn every_trigger_that_fires_raises_an_event_or_counts_as_lost() {
    use vdaq_wire::control::{trigger_mode, TriggerConfig};
    let mut card = card(
        Settings {
            clock: ClockMode::FreeRunning,
            ..settings()
        },
        1024,
    );
    card.set_trigger_enabled(true);
    let mut out = Vec::new();
    // The counter's values are all near 0: LEVEL_BELOW +0.5 with a 1-frame window fires on
    // every frame, 100 times in one 100-frame buffer.
    let below = TriggerConfig {
        mode: trigger_mode::LEVEL_BELOW,
        reserved: 0,
        channel: 0.into(),
        threshold_ppm: 500_000.into(),
        pre_frames: 0.into(),
        post_frames: 1.into(),
    };
    assert_eq!(card.set_trigger(&below), CommandStatus::Ok);
    card.start(0);
    card.post(buffer(100), 0, &mut out);
    card.advance(0, &mut out);
    let events = std::iter::from_fn(|| card.pop_event()).count() as u64;
    assert_eq!(events + u64::from(card.counters().events_lost), 100);
}

/// A scripted corruption without the CRC feature changes the payload's first byte, whatever
/// the signal: also for a FILE signal, whose samples cannot be rendered again.
#[test]
fn corrupting_a_file_signal_buffer_without_crc_changes_its_payload() {
    let run = |corrupt: bool| {
        let mut card = card(
            Settings {
                signal: SignalKind::File,
                clock: ClockMode::FreeRunning,
                ..settings()
            },
            1024,
        );
        card.set_source(std::sync::Arc::new(source::FileSource {
            channels: 2,
            samples: vec![0.3, -0.7, 0.55, 0.15],
        }));
        let mut out = Vec::new();
        if corrupt {
            card.apply(scenario::Action::CorruptCrc(1), 0);
        }
        card.start(0);
        card.post(buffer(4), 0, &mut out);
        card.advance(0, &mut out);
        assert_eq!(out.len(), 1);
        out.remove(0).buffer.payload().to_vec()
    };
    let clean = run(false);
    let corrupted = run(true);
    assert_eq!(
        corrupted[0],
        clean[0] ^ 0xff,
        "the byte written was flipped"
    );
    assert_eq!(corrupted[1..], clean[1..], "and nothing else");
}

/// In deterministic mode after STOP/START, frames that went through the FIFO (a stall) and
/// frames filled directly belong to the same clock run: one buffer takes both, no pause.
#[test]
fn deterministic_fifo_and_direct_frames_after_a_restart_share_one_clock_run() {
    let mut card = card(settings(), 256);
    card.set_deterministic(true);
    card.set_scenario(
        scenario::Scenario::parse(
            "[[step]]\nat_frame = 150\naction = \"stall\"\nduration_ms = 10\n",
        )
        .expect("valid"),
    );
    let mut out = Vec::new();
    card.start(0);
    card.post(buffer(100), 0, &mut out);
    card.advance(1, &mut out);
    card.stop(1, &mut out);
    card.start(1);
    card.post(buffer(100), 1, &mut out);
    card.advance(2, &mut out);
    let second = out
        .iter()
        .map(|c| c.buffer.header())
        .find(|h| h.first_frame.get() == 100)
        .expect("the buffer after the restart");
    assert_eq!(
        second.flags.get() & flags::PAUSED,
        0,
        "no pause inside one run"
    );
    assert_eq!(
        second.frame_count.get(),
        100,
        "it took the direct and the FIFO frames"
    );
}
