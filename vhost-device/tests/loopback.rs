//! Loopback tests: the real `vhost-device-daq` binary, a real Unix socket, memfd guest
//! memory shared with an in-process vhost-user frontend, real rings, and the call eventfd as
//! the interrupt. Every sample is verified.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vdaq_driver::{DmaBuffer, DriverOptions, Wait};
use vdaq_loopback::{BackendProcess, DriverRig, Resubmit};
use vdaq_wire::buffer::HEADER_SIZE;
use vdaq_wire::check::StreamVerifier;
use vdaq_wire::event::kind;
use vdaq_wire::feature;
use vdaq_wire::{DeviceState, SampleFormat};

fn backend(args: &[&str]) -> BackendProcess {
    BackendProcess::spawn(Path::new(env!("CARGO_BIN_EXE_vhost-device-daq")), args)
        .expect("backend starts")
}

/// The reference driver connected to `backend`, every wait bounded by `timeout`.
fn rig(backend: &BackendProcess, options: DriverOptions, timeout: Duration) -> DriverRig {
    DriverRig::connect(backend.socket(), options, timeout).expect("connect")
}

#[test]
fn loopback_free_running_stream_verifies_every_sample_with_crc() {
    let backend = backend(&["--clock", "free", "--channels", "4", "--format", "s16"]);
    let mut rig = rig(
        &backend,
        DriverOptions {
            crc: true,
            trigger: false,
        },
        Duration::from_secs(60),
    );
    assert_ne!(rig.driver.features() & (1 << feature::DAQ_F_CRC32), 0);
    let mut verifier = StreamVerifier::new(SampleFormat::S16, 4, true).require_crc(true);
    rig.driver.start(&mut rig.wait).expect("START");
    rig.stream(&mut verifier, 32, 16 * 1024, 2_000_000, Resubmit::Batched)
        .expect("stream");
    rig.stop_and_drain(&mut verifier).expect("drain");
    assert_eq!(rig.driver.in_flight(), 0, "FLUSH returned every buffer");
    let stats = verifier.stats();
    let status = rig.driver.status(&mut rig.wait).expect("status");
    assert_eq!(stats.errors, 0);
    assert_eq!(stats.crc_checked, stats.buffers);
    assert_eq!(stats.frames, status.frames_delivered.get());
    assert_eq!(
        status.frames_dropped.get(),
        0,
        "free-running never overruns"
    );
    assert_eq!(status.buffers_held.get(), 0);
    assert!(rig.interrupts() > 0, "completions arrived by interrupt");
}

#[test]
fn loopback_paced_overrun_accounts_for_every_sample() {
    // 2 MHz into a 1024-frame FIFO while the application sleeps: overrun is certain.
    let backend = backend(&[
        "--rate",
        "2000000",
        "--channels",
        "2",
        "--format",
        "s32",
        "--fifo-frames",
        "1024",
        "--watermark",
        "64",
        "--latency-us",
        "2000",
    ]);
    // The driver keeps its event buffers posted itself.
    let mut rig = rig(&backend, DriverOptions::default(), Duration::from_secs(60));
    let mut verifier = StreamVerifier::new(SampleFormat::S32, 2, true);
    for _ in 0..4 {
        rig.driver
            .submit_read(DmaBuffer::new(HEADER_SIZE + 256 * 8))
            .map_err(|(err, _)| err)
            .expect("submit");
    }
    rig.driver.start(&mut rig.wait).expect("START");
    std::thread::sleep(Duration::from_millis(50));
    rig.stream(
        &mut verifier,
        16,
        HEADER_SIZE + 4096 * 8,
        200_000,
        Resubmit::Batched,
    )
    .expect("stream");
    rig.stop_and_drain(&mut verifier).expect("drain");
    let stats = verifier.stats();
    let status = rig.driver.status(&mut rig.wait).expect("status");
    assert_eq!(stats.errors, 0);
    assert!(
        stats.overrun_buffers > 0,
        "an overrun was flagged in a header"
    );
    assert_eq!(stats.frames, status.frames_delivered.get());
    assert_eq!(stats.dropped_frames, status.frames_dropped.get());
    assert_eq!(
        status.frames_produced.get(),
        status.frames_delivered.get() + status.frames_dropped.get() + status.frames_pending.get(),
        "produced = delivered + dropped + pending"
    );
    let mut reported = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    rig.wait.deadline = deadline;
    while reported < status.frames_dropped.get() && Instant::now() < deadline {
        rig.driver.service();
        while let Some(event) = rig.driver.next_event() {
            if event.kind.get() == kind::OVERRUN {
                reported += event.arg0.get();
            }
        }
        if reported < status.frames_dropped.get() && !rig.irq.is_pending() {
            rig.wait.wait();
        }
    }
    assert_eq!(
        reported,
        status.frames_dropped.get(),
        "OVERRUN events add up"
    );
}

#[test]
fn loopback_backend_serves_the_next_connection_after_a_disconnect() {
    let backend = backend(&["--clock", "free", "--channels", "1", "--format", "f32"]);
    for _ in 0..2 {
        let mut rig = rig(&backend, DriverOptions::default(), Duration::from_secs(30));
        let mut verifier = StreamVerifier::new(SampleFormat::F32, 1, true);
        rig.driver.start(&mut rig.wait).expect("START");
        rig.stream(&mut verifier, 8, 4096, 10_000, Resubmit::Batched)
            .expect("stream");
        // Each connection starts from a reset device: sequence 0 (the verifier starts there)
        // and stream index 0.
        assert_eq!(verifier.stats().errors, 0);
        // The stream's end equals everything it carried: it started at frame 0.
        let stats = verifier.stats();
        assert_eq!(
            verifier.next_frame(),
            Some(stats.frames + stats.dropped_frames),
            "the stream restarted at frame 0"
        );
    }
}

#[test]
fn loopback_garbage_on_the_socket_ends_only_that_connection() {
    let mut backend = backend(&["--clock", "free"]);
    {
        let mut rogue = UnixStream::connect(backend.socket()).expect("connect");
        // A header claiming request 0xdead with a huge size, then junk.
        rogue
            .write_all(&[
                0xad, 0xde, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3,
            ])
            .expect("write");
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(backend.is_running(), "the daemon survived");
    let mut rig = rig(&backend, DriverOptions::default(), Duration::from_secs(30));
    let mut verifier = StreamVerifier::new(SampleFormat::S16, 4, true);
    rig.driver.start(&mut rig.wait).expect("START");
    rig.stream(&mut verifier, 8, 4096, 10_000, Resubmit::Batched)
        .expect("stream");
}

#[test]
fn loopback_config_space_and_status_through_vhost_user() {
    let backend = backend(&[
        "--rate",
        "48000",
        "--channels",
        "8",
        "--fifo-frames",
        "4096",
    ]);
    let mut rig = rig(&backend, DriverOptions::default(), Duration::from_secs(30));
    let config = rig.driver.config().expect("config");
    assert_eq!(&config.model[..8], b"vdaq-sim");
    assert_eq!(config.rate_hz.get(), 48_000);
    assert_eq!(config.channels.get(), 8);
    assert_eq!(config.fifo_frames.get(), 4096);
    assert_eq!(config.state, DeviceState::Stopped as u8);
    rig.driver.start(&mut rig.wait).expect("START");
    assert_eq!(
        rig.driver.config().expect("config").state,
        DeviceState::Running as u8
    );
    let (status, _) = rig
        .driver
        .command_raw(0x7777, &[], &mut rig.wait)
        .expect("reply");
    assert_eq!(status, vdaq_wire::control::status::UNSUPPORTED);
    let first = rig
        .driver
        .status(&mut rig.wait)
        .expect("status")
        .device_time_ns
        .get();
    std::thread::sleep(Duration::from_millis(20));
    let second = rig
        .driver
        .status(&mut rig.wait)
        .expect("status")
        .device_time_ns
        .get();
    assert!(
        second >= first + 20_000_000,
        "device clock advances in real time"
    );
}

#[test]
fn loopback_record_then_replay_gives_back_the_recorded_samples() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recording = dir.path().join("take.vdaqrec");
    let recording_arg = recording.to_str().expect("utf-8 path");
    {
        let backend = backend(&[
            "--clock",
            "free",
            "--channels",
            "2",
            "--format",
            "s16",
            "--record",
            recording_arg,
        ]);
        let mut rig = rig(&backend, DriverOptions::default(), Duration::from_secs(30));
        let mut verifier = StreamVerifier::new(SampleFormat::S16, 2, true);
        rig.driver.start(&mut rig.wait).expect("START");
        rig.stream(&mut verifier, 8, 4096, 50_000, Resubmit::Batched)
            .expect("stream");
        rig.driver.stop(&mut rig.wait).expect("STOP");
        drop(rig); // the connection ends: the backend resets and flushes the recording
        std::thread::sleep(Duration::from_millis(200));
    }
    let size = std::fs::metadata(&recording)
        .expect("recording exists")
        .len();
    assert!(
        size > 50_000 * 4,
        "the recording holds the stream ({size} bytes)"
    );
    // Replay it as the signal: the samples are the counter pattern the first run delivered.
    let backend = backend(&[
        "--clock",
        "free",
        "--channels",
        "2",
        "--format",
        "s16",
        "--signal",
        "file",
        "--source",
        recording_arg,
    ]);
    let mut rig = rig(&backend, DriverOptions::default(), Duration::from_secs(30));
    assert_eq!(
        rig.driver.config().expect("config").signal,
        vdaq_wire::SignalKind::File as u8
    );
    let mut verifier = StreamVerifier::new(SampleFormat::S16, 2, true);
    rig.driver.start(&mut rig.wait).expect("START");
    rig.stream(&mut verifier, 8, 4096, 40_000, Resubmit::Batched)
        .expect("stream");
    assert_eq!(
        verifier.stats().errors,
        0,
        "replayed samples equal the recorded ones"
    );
}
