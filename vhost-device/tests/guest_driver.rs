//! The reference guest driver (guest-driver/) on the host: the same code that runs in the
//! bare-metal guest, over the vhost-user loopback transport, against the real backend process.
//! Interrupts arrive asynchronously from a thread watching the call eventfds, which runs the
//! driver's top half, exactly where a guest's interrupt handler would.

use std::path::Path;
use std::time::Duration;

use vdaq_driver::{DmaBuffer, DriverError, DriverOptions, ReadOutcome, Wait};
use vdaq_loopback::{DriverRig, Resubmit};
use vdaq_wire::buffer::HEADER_SIZE;
use vdaq_wire::check::StreamVerifier;
use vdaq_wire::SampleFormat;

/// The driver against its own backend process.
fn rig(args: &[&str], options: DriverOptions, timeout: Duration) -> DriverRig {
    DriverRig::spawn(
        Path::new(env!("CARGO_BIN_EXE_vhost-device-daq")),
        args,
        options,
        timeout,
    )
    .expect("backend starts and the driver initialises")
}

/// The application loop: keep `in_flight` reads submitted, consume completions in order,
/// verify every sample, resubmit one by one; sleep only when there is nothing to consume.
fn stream(
    rig: &mut DriverRig,
    verifier: &mut StreamVerifier,
    in_flight: usize,
    bytes: usize,
    frames: u64,
) {
    rig.stream(verifier, in_flight, bytes, frames, Resubmit::Each)
        .expect("every sample verifies");
}

#[test]
fn driver_streams_by_interrupt_and_drains_everything_on_shutdown() {
    let mut rig = rig(
        &["--clock", "free", "--channels", "2", "--format", "s32"],
        DriverOptions {
            crc: true,
            trigger: false,
        },
        Duration::from_secs(60),
    );
    let mut verifier = StreamVerifier::new(SampleFormat::S32, 2, true).require_crc(true);
    rig.driver.start(&mut rig.wait).expect("START");
    stream(&mut rig, &mut verifier, 64, 16 * 1024, 400_000);
    let in_flight = rig.driver.in_flight();
    assert_eq!(in_flight, 64);
    let report = rig.driver.shutdown(&mut rig.wait).expect("shutdown");
    assert_eq!(report.in_flight_at_start, 64);
    assert_eq!(report.returned, 64, "every in-flight read came back");
    assert_eq!(report.device_held_after, 0, "the device holds no buffer");
    assert_eq!(rig.driver.in_flight(), 0);
    // The returned reads carry the tail of the stream, still verifiable.
    while let Some(done) = rig.driver.next_completion() {
        if let ReadOutcome::Data(_) = done.outcome {
            verifier
                .check(done.buffer.as_slice(), done.used_len)
                .expect("drained buffers verify");
        }
    }
    let stats = rig.driver.stats();
    assert!(
        rig.irq.interrupts() > 0,
        "completions were delivered by interrupts"
    );
    assert!(stats.bottom_halves > 0);
    assert_eq!(verifier.stats().errors, 0);
    assert_eq!(
        verifier.stats().frames,
        report.status.frames_delivered.get()
    );
}

#[test]
fn driver_keeps_notifying_across_the_16_bit_ring_index_wrap() {
    let mut rig = rig(
        &["--clock", "free", "--channels", "1", "--format", "s16"],
        DriverOptions::default(),
        Duration::from_secs(120),
    );
    let mut verifier = StreamVerifier::new(SampleFormat::S16, 1, true);
    rig.driver.start(&mut rig.wait).expect("START");
    // 70 000 completions of 512 samples: the avail and used indices wrap past 65 535.
    // Resubmitted in batches with one kick per pass, the guest's way, where a batch can step
    // over the 16-bit wrap of the avail index.
    rig.stream(
        &mut verifier,
        8,
        HEADER_SIZE + 1024,
        70_000 * 512,
        Resubmit::Batched,
    )
    .expect("every sample verifies");
    assert!(verifier.stats().buffers >= 70_000);
    rig.driver.shutdown(&mut rig.wait).expect("shutdown");
}

#[test]
fn driver_cancel_returns_the_buffer_as_cancelled() {
    let mut rig = rig(
        &["--rate", "1000"],
        DriverOptions::default(),
        Duration::from_secs(30),
    );
    let ids: Vec<_> = (0..4)
        .map(|_| {
            rig.driver
                .submit_read(DmaBuffer::new(HEADER_SIZE + 64 * 1024))
                .map_err(|(err, _)| err)
                .expect("submit")
        })
        .collect();
    assert!(rig.driver.cancel(ids[2]));
    assert!(!rig.driver.cancel(vdaq_driver::RequestId(999)));
    let returned = rig.driver.flush(&mut rig.wait).expect("FLUSH");
    assert_eq!(returned, 4);
    let mut outcomes = Vec::new();
    while let Some(done) = rig.driver.next_completion() {
        outcomes.push((done.id, done.outcome));
    }
    assert_eq!(outcomes.len(), 4);
    assert_eq!(outcomes[2], (ids[2], ReadOutcome::Cancelled));
    assert!(matches!(outcomes[0].1, ReadOutcome::Data(_)));
    assert_eq!(rig.driver.in_flight(), 0);
}

#[test]
fn driver_checks_buffer_sizes_and_gives_refused_buffers_back() {
    let mut rig = rig(
        &["--channels", "4", "--format", "s32"],
        DriverOptions::default(),
        Duration::from_secs(30),
    );
    assert_eq!(rig.driver.frame_bytes(), 16);
    let (err, buffer) = rig
        .driver
        .submit_read(DmaBuffer::new(HEADER_SIZE + 15))
        .expect_err("too small for one frame");
    assert!(matches!(
        err,
        DriverError::BufferTooSmall {
            len: 79,
            needed: 80
        }
    ));
    assert_eq!(buffer.len(), HEADER_SIZE + 15, "the buffer came back");
    assert_eq!(rig.driver.in_flight(), 0);
}

#[test]
fn driver_shutdown_returns_reads_the_device_was_still_filling() {
    let mut rig = rig(
        &["--rate", "10000", "--latency-us", "5000000"],
        DriverOptions::default(),
        Duration::from_secs(30),
    );
    rig.driver.start(&mut rig.wait).expect("START");
    for _ in 0..32 {
        rig.driver
            .submit_read(DmaBuffer::new(HEADER_SIZE + 1024 * 1024))
            .map_err(|(err, _)| err)
            .expect("submit");
    }
    std::thread::sleep(Duration::from_millis(30));
    let report = rig.driver.shutdown(&mut rig.wait).expect("shutdown");
    assert_eq!(report.in_flight_at_start, 32);
    assert_eq!(report.returned, 32);
    assert_eq!(
        report.flush_returned, 31,
        "STOP completed the partly filled one"
    );
    assert_eq!(report.device_held_after, 0);
    let status = report.status;
    assert_eq!(
        status.frames_produced.get(),
        status.frames_delivered.get() + status.frames_dropped.get() + status.frames_pending.get()
    );
    assert!(matches!(
        rig.driver.submit_read(DmaBuffer::new(4096)),
        Err((DriverError::ShuttingDown, _))
    ));
}

#[test]
fn driver_arms_a_rising_edge_trigger_and_receives_flagged_buffers_and_events() {
    use vdaq_wire::buffer::flags;
    use vdaq_wire::control::{trigger_mode, Opcode, TriggerConfig};
    use vdaq_wire::event::kind;
    use vdaq_wire::zerocopy::IntoBytes;
    // A 1 kHz square wave, free-running (nominal 1 MHz): rising edges every 1000 frames.
    let mut rig = rig(
        &[
            "--clock",
            "free",
            "--channels",
            "2",
            "--format",
            "s16",
            "--signal",
            "square",
            "--signal-freq",
            "1000",
        ],
        DriverOptions {
            crc: false,
            trigger: true,
        },
        Duration::from_secs(30),
    );
    let config = TriggerConfig {
        mode: trigger_mode::RISING,
        reserved: 0,
        channel: 0.into(),
        threshold_ppm: 0.into(),
        pre_frames: 0.into(),
        post_frames: 500.into(),
    };
    rig.driver
        .command(Opcode::SetTrigger, config.as_bytes(), &mut rig.wait)
        .expect("SET_TRIGGER");
    let mut verifier = StreamVerifier::new(SampleFormat::S16, 2, false);
    rig.driver.start(&mut rig.wait).expect("START");
    let mut triggered_at = Vec::new();
    for _ in 0..8 {
        rig.driver
            .submit_read(DmaBuffer::new(HEADER_SIZE + 4 * 1000))
            .map_err(|(err, _)| err)
            .expect("submit");
    }
    while verifier.stats().frames < 10_000 {
        rig.driver.service();
        while let Some(done) = rig.driver.next_completion() {
            let header = verifier
                .check(done.buffer.as_slice(), done.used_len)
                .expect("stream verifies");
            if header.flags.get() & flags::TRIGGERED != 0 {
                triggered_at.push(header.first_frame.get() + u64::from(header.trigger_frame.get()));
            }
            rig.driver
                .submit_read(done.buffer)
                .map_err(|(err, _)| err)
                .expect("resubmit");
        }
        if !rig.irq.is_pending() {
            assert!(rig.wait.wait(), "stalled");
        }
    }
    // A free-running card streams 10 000 frames in about a millisecond: the events, which
    // follow their buffers, may still be on their way. Wait for them (bounded).
    let mut events: Vec<u64> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while events.len() < 8 && std::time::Instant::now() < deadline {
        rig.driver.service();
        events.extend(
            std::iter::from_fn(|| rig.driver.next_event())
                .filter(|e| e.kind.get() == kind::TRIGGER)
                .map(|e| e.arg0.get()),
        );
        if events.len() < 8 && !rig.irq.is_pending() {
            rig.wait.wait();
        }
    }
    rig.driver.shutdown(&mut rig.wait).expect("shutdown");
    events.extend(
        std::iter::from_fn(|| rig.driver.next_event())
            .filter(|e| e.kind.get() == kind::TRIGGER)
            .map(|e| e.arg0.get()),
    );
    assert!(
        triggered_at.len() >= 9,
        "one rising edge per 1000 frames: {triggered_at:?}"
    );
    for (i, frame) in triggered_at.iter().enumerate() {
        assert_eq!(*frame, 1000 * (i as u64 + 1), "edges at whole periods");
    }
    assert!(
        events.starts_with(&triggered_at[..8]),
        "events match the flags: {events:?}"
    );
}

fn scenario(name: &str) -> String {
    format!("{}/../scenarios/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Services the driver until `done` holds or 10 s pass.
fn service_until(rig: &mut DriverRig, mut done: impl FnMut(&DriverRig) -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        rig.driver.service();
        if done(rig) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// A rig on the `needs-reset.toml` card, streamed until the scenario's NEEDS_RESET ends the
/// stream.
fn streamed_into_needs_reset() -> DriverRig {
    let needs_reset = scenario("needs-reset.toml");
    let mut rig = rig(
        &["--clock", "free", "--scenario", &needs_reset],
        DriverOptions::default(),
        Duration::from_secs(60),
    );
    let mut verifier = StreamVerifier::new(SampleFormat::S16, 4, true);
    rig.driver.start(&mut rig.wait).expect("START");
    let ended = rig.stream(&mut verifier, 16, 4096, 2_000_000, Resubmit::Each);
    assert!(ended.is_err(), "the scenario's NEEDS_RESET ends the stream");
    rig
}

/// Resets the device, takes every read back, starts again and streams 100 000 frames, every
/// sample verified.
fn recover_and_stream_again(rig: &mut DriverRig) {
    rig.driver.recover(&mut rig.wait).expect("reset");
    while rig.driver.next_completion().is_some() {}
    rig.driver
        .start(&mut rig.wait)
        .expect("START after the reset");
    let mut verifier = StreamVerifier::new(SampleFormat::S16, 4, true);
    stream(rig, &mut verifier, 16, 4096, 100_000);
    assert_eq!(verifier.stats().errors, 0, "streams again after the reset");
}

/// spec: [4-3] [6.13-1] NEEDS_RESET: `state`, a configuration-change notification that the
/// frontend relays (CONFIG_CHANGE_MSG), and the event; the driver recovers.
#[test]
fn needs_reset_reaches_the_driver_as_a_configuration_change_and_is_recovered() {
    let mut rig = streamed_into_needs_reset();
    assert!(
        service_until(&mut rig, |rig| rig.driver.stats().config_changes >= 1),
        "a configuration-change interrupt arrived (CONFIG_CHANGE_MSG went out and was relayed)"
    );
    assert!(
        rig.driver.needs_reset(),
        "the driver read `state` = NEEDS_RESET"
    );
    assert_eq!(
        rig.driver.config().expect("config").state,
        vdaq_wire::DeviceState::NeedsReset as u8
    );
    recover_and_stream_again(&mut rig);
    // Longer than the loopback frontend's lag on a backend request.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rig.config_changes_while_stopped(), 0);
}

/// spec: [6.13-9] A driver that resets the moment it learns of NEEDS_RESET (from whichever
/// path) must not find the configuration-change message still unread by the frontend: QEMU's
/// generic device would then take it with the device stopped, and die. The loopback frontend
/// takes its time with backend requests, as QEMU's main loop does on a loaded host.
#[test]
fn a_driver_resetting_at_once_on_needs_reset_never_stops_the_device_under_an_unread_notification() {
    let mut rig = streamed_into_needs_reset();
    assert!(
        service_until(&mut rig, |rig| rig.driver.needs_reset()),
        "the driver learns of NEEDS_RESET"
    );
    recover_and_stream_again(&mut rig);
    // Longer than the loopback frontend's lag on a backend request.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        rig.config_changes_while_stopped(),
        0,
        "every configuration-change message reached a running device"
    );
}

/// spec: [4-4] a settings change the driver did not make is notified.
#[test]
fn settings_changed_while_running_reach_the_driver_as_a_configuration_change() {
    let set_signal = scenario("set-signal.toml");
    let mut rig = rig(
        &["--clock", "free", "--scenario", &set_signal],
        DriverOptions::default(),
        Duration::from_secs(60),
    );
    assert_eq!(
        rig.driver.config().expect("config").signal,
        vdaq_wire::SignalKind::Counter as u8
    );
    let mut verifier = StreamVerifier::new(SampleFormat::S16, 4, true);
    rig.driver.start(&mut rig.wait).expect("START");
    stream(&mut rig, &mut verifier, 16, 4096, 700_000);
    assert!(
        service_until(&mut rig, |rig| rig.driver.stats().config_changes >= 1),
        "set_signal was notified"
    );
    assert!(!rig.driver.needs_reset(), "a settings change is no reset");
    assert_eq!(
        rig.driver.config().expect("config").signal,
        vdaq_wire::SignalKind::Noise as u8,
        "the config space shows the signal now sampled"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rig.config_changes_while_stopped(), 0);
}
