//! End to end: the `vdaq` launcher boots the bare-metal guest, or the Linux guest (Debian's
//! kernel, the vdaq kernel module, the io_uring application), in real QEMU with the real
//! backend (vhost-user over a Unix socket, shared memfd memory, MSI-X or IOAPIC interrupts),
//! and these tests check the guest's JSON report.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vdaq_launcher::tools::{self, Kvm};

mod common;
use common::{n, processes_mentioning, vdaq};

/// Checks every run must satisfy: interrupts delivered the data, every sample verified, the
/// accounting balances, and shutdown left nothing in the device.
fn assert_sound(report: &Value) {
    assert_eq!(report["pass"], true, "guest verdict: {}", report["failure"]);
    assert!(n(report, "frames") > 0, "data arrived");
    assert!(n(report, "interrupts") > 0, "by interrupt");
    assert_eq!(n(report, "verify_errors"), 0);
    assert_eq!(n(report, "frames"), n(report, "device_delivered"));
    // Drops after the last returned buffer cannot be in a header; the guest checks those
    // exactly against the device's counters (its verdict), here only the bound.
    assert!(n(report, "dropped_frames") <= n(report, "device_dropped"));
    assert_eq!(
        n(report, "device_produced"),
        n(report, "device_delivered") + n(report, "device_dropped") + n(report, "device_pending"),
        "produced = delivered + dropped + pending"
    );
    assert_eq!(
        n(report, "shutdown_returned"),
        n(report, "shutdown_in_flight")
    );
    assert_eq!(n(report, "device_held_after"), 0);
}

#[test]
fn e2e_q35_pci_msix_tcg_stream_verifies_every_sample() {
    let (ok, report) = vdaq(&[
        "--machine",
        "q35",
        "--accel",
        "tcg",
        "--duration",
        "2",
        "--rate",
        "2000000",
        "--crc",
    ]);
    assert!(ok);
    assert_sound(&report);
    assert_eq!(report["transport"], "pci");
    assert_eq!(n(&report, "crc_checked"), n(&report, "completions"));
    assert_eq!(
        n(&report, "dropped_frames"),
        0,
        "64 reads in flight keep up with 2 MHz"
    );
}

#[test]
fn e2e_microvm_mmio_tcg_stream_verifies_every_sample() {
    let (ok, report) = vdaq(&[
        "--machine",
        "microvm",
        "--accel",
        "tcg",
        "--duration",
        "2",
        "--rate",
        "1000000",
        "--format",
        "s32",
        "--channels",
        "2",
    ]);
    assert!(ok);
    assert_sound(&report);
    assert_eq!(report["transport"], "mmio");
    assert!(
        n(&report, "device_dropped") * 20 < n(&report, "device_produced"),
        "under 5 % of the stream dropped"
    );
}

#[test]
fn e2e_overrun_reports_every_dropped_sample() {
    let (ok, report) = vdaq(&[
        "--machine",
        "q35",
        "--accel",
        "tcg",
        "--mode",
        "overrun",
        "--duration",
        "2",
        "--reads",
        "4",
        "--rate",
        "1000000",
    ]);
    assert!(ok);
    assert_sound(&report);
    let dropped = n(&report, "dropped_frames");
    assert!(dropped > 0, "the slow application overran the FIFO");
    assert!(n(&report, "overrun_buffers") > 0);
    assert_eq!(
        n(&report, "overrun_event_frames"),
        n(&report, "device_dropped"),
        "OVERRUN events add up to every dropped frame"
    );
}

#[test]
fn e2e_shutdown_drains_reads_still_in_the_device() {
    // 1 MiB buffers at 100 kHz × 4 × s16 take > 1 s each: all 32 are in flight at shutdown.
    let (ok, report) = vdaq(&[
        "--machine",
        "q35",
        "--accel",
        "tcg",
        "--mode",
        "shutdown",
        "--duration",
        "0.5",
        "--rate",
        "100000",
        "--buffer-size",
        "1048576",
        "--reads",
        "32",
    ]);
    assert!(ok);
    assert_sound(&report);
    assert_eq!(n(&report, "shutdown_in_flight"), 32);
    assert_eq!(n(&report, "shutdown_returned"), 32);
}

#[test]
fn e2e_kvm_smoke_when_kvm_is_usable() {
    if tools::kvm() == Kvm::Absent {
        eprintln!("skipped: /dev/kvm is not usable on this machine");
        return;
    }
    // This machine's KVM may be software-nested (very slow): keep the run tiny.
    let (ok, report) = vdaq(&[
        "--machine",
        "microvm",
        "--accel",
        "kvm",
        "--duration",
        "0.3",
        "--rate",
        "50000",
        "--reads",
        "8",
        "--buffer-size",
        "4096",
        "--timeout",
        "240",
    ]);
    assert!(ok);
    assert_sound(&report);
}

#[test]
fn e2e_interrupting_the_launcher_leaves_no_process_or_socket() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vdaq"))
        .args([
            "--machine",
            "q35",
            "--accel",
            "tcg",
            "--duration",
            "60",
            "--rate",
            "100000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vdaq");
    let pid = child.id();
    let run_dir_prefix = format!("vdaq-run-{pid}-");
    // Wait until QEMU and the backend are up (the run directory and a QEMU child exist).
    let deadline = Instant::now() + Duration::from_secs(120);
    while processes_mentioning(&[&run_dir_prefix]).len() < 2 {
        assert!(Instant::now() < deadline, "vdaq never started its children");
        assert!(
            child.try_wait().expect("poll").is_none(),
            "vdaq exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill() on our own child with a valid signal.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let status = child.wait().expect("wait");
    assert!(!status.success(), "an interrupted run is not a pass");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_mentioning(&[&run_dir_prefix]).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        processes_mentioning(&[&run_dir_prefix]),
        Vec::<u32>::new(),
        "no stray process"
    );
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("tmp")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&run_dir_prefix))
        .collect();
    assert!(
        leftovers.is_empty(),
        "run directory (socket) removed: {leftovers:?}"
    );
}

/// Runs with a scenario from scenarios/.
fn vdaq_scenario(scenario: &str, extra: &[&str]) -> (bool, Value) {
    vdaq_scenario_on("q35", scenario, extra)
}

/// [`vdaq_scenario`] on `machine`.
fn vdaq_scenario_on(machine: &str, scenario: &str, extra: &[&str]) -> (bool, Value) {
    let path = format!("{}/../scenarios/{scenario}", env!("CARGO_MANIFEST_DIR"));
    let mut args = vec![
        "--machine",
        machine,
        "--accel",
        "tcg",
        "--duration",
        "1.5",
        "--scenario",
        &path,
    ];
    args.extend_from_slice(extra);
    vdaq(&args)
}

/// spec: [6.2-3] [6.4-1] 1 to 1024 channels, every format, each frame and buffer size checked
/// exactly.
#[test]
fn e2e_one_and_1024_channels_stream_and_verify_in_every_format() {
    for (channels, rate) in [("1", "200000"), ("1024", "2000")] {
        for format in ["s16", "s32", "f32"] {
            let (ok, report) = vdaq(&[
                "--machine",
                "microvm",
                "--accel",
                "tcg",
                "--duration",
                "0.4",
                "--rate",
                rate,
                "--channels",
                channels,
                "--format",
                format,
            ]);
            let what = format!("{channels} channels of {format}");
            assert!(ok, "{what}: {}", report["failure"]);
            assert_sound(&report);
            let channels: u64 = channels.parse().expect("number");
            assert_eq!(n(&report, "device_dropped"), 0, "{what}: nothing lost");
            assert_eq!(
                n(&report, "samples"),
                n(&report, "frames") * channels,
                "{what}: every sample of every frame verified"
            );
        }
    }
}

/// Coalescing holds interrupts back for up to the latency bound: with a bound far above the
/// guest's 30 ms lost-interrupt watchdog, that must not count as lost interrupts.
#[test]
fn e2e_coalescing_with_a_long_latency_bound_is_no_lost_interrupt() {
    let (ok, report) = vdaq(&[
        "--machine",
        "microvm",
        "--accel",
        "tcg",
        "--duration",
        "1",
        "--rate",
        "20000",
        "--coalesce",
        "8",
        "--latency-us",
        "80000",
        "--reads",
        "16",
        "--buffer-size",
        "4096",
    ]);
    assert!(ok, "{}", report["failure"]);
    assert_sound(&report);
    assert_eq!(
        n(&report, "watchdog_recoveries"),
        0,
        "held-back notifications are coalescing, not lost interrupts"
    );
    assert!(
        n(&report, "completions") > 4 * n(&report, "interrupts") / 2,
        "interrupts were coalesced: {} completions, {} interrupts",
        n(&report, "completions"),
        n(&report, "interrupts")
    );
}

#[test]
fn e2e_lost_irq_watchdog_recovers_every_completion() {
    let (ok, report) = vdaq_scenario("lost-irq.toml", &[]);
    assert!(ok);
    assert_sound(&report);
    assert!(
        n(&report, "watchdog_recoveries") > 0,
        "the watchdog found the lost interrupts"
    );
}

#[test]
fn e2e_stall_overrun_reports_every_dropped_sample() {
    let (ok, report) = vdaq_scenario("stall.toml", &[]);
    assert!(ok);
    assert_sound(&report);
    assert!(
        n(&report, "dropped_frames") > 0,
        "the stall overran the FIFO"
    );
    assert_eq!(
        n(&report, "overrun_event_frames"),
        n(&report, "device_dropped")
    );
}

#[test]
fn e2e_crc_corruption_is_detected_and_fails_the_run() {
    let (ok, report) = vdaq_scenario("crc.toml", &["--crc"]);
    assert!(!ok, "corrupted data must not pass");
    assert_eq!(report["pass"], false);
    assert_eq!(report["failure"], "payload CRC mismatch");
    assert_eq!(n(&report, "crc_errors"), 1);
    // Everything else still adds up.
    assert_eq!(
        n(&report, "device_produced"),
        n(&report, "device_delivered")
            + n(&report, "device_dropped")
            + n(&report, "device_pending")
    );
    assert_eq!(n(&report, "device_held_after"), 0);
}

#[test]
fn e2e_fault_event_is_reported() {
    let (ok, report) = vdaq_scenario("fault.toml", &[]);
    assert!(ok);
    assert_sound(&report);
    assert_eq!(n(&report, "fault_events"), 1);
}

#[test]
fn e2e_deterministic_runs_give_identical_stream_hashes() {
    let run = |seed: &str, signal: &str| {
        let (ok, report) = vdaq_scenario(
            "deterministic.toml",
            &[
                "--deterministic",
                "--hash",
                "--frames",
                "400000",
                "--rate",
                "1000000",
                "--signal",
                signal,
                "--seed",
                seed,
            ],
        );
        assert!(ok, "run passes: {}", report["failure"]);
        report
    };
    let first = run("1", "counter");
    let second = run("1", "counter");
    assert_ne!(n(&first, "stream_hash"), 0);
    assert_eq!(
        n(&first, "stream_hash"),
        n(&second, "stream_hash"),
        "bit-identical streams"
    );
    assert!(
        n(&first, "dropped_frames") > 0,
        "the scripted stall dropped frames"
    );
    assert_eq!(
        n(&first, "dropped_frames"),
        n(&second, "dropped_frames"),
        "at the same place"
    );
    assert_eq!(n(&first, "fault_events"), 1);
    let noise_a = run("1", "noise");
    let noise_b = run("1", "noise");
    let noise_c = run("2", "noise");
    assert_eq!(
        n(&noise_a, "stream_hash"),
        n(&noise_b, "stream_hash"),
        "seeded noise repeats"
    );
    assert_ne!(
        n(&noise_a, "stream_hash"),
        n(&noise_c, "stream_hash"),
        "another seed differs"
    );
}

#[test]
fn e2e_needs_reset_is_recovered_and_streaming_resumes() {
    let (ok, report) = vdaq_scenario("needs-reset.toml", &["--rate", "1000000"]);
    assert!(ok, "{}", report["failure"]);
    assert!(
        n(&report, "reset_recoveries") >= 1,
        "the driver reset the device"
    );
    assert!(
        n(&report, "config_interrupts") >= 1,
        "NEEDS_RESET arrived as a configuration-change interrupt (PCI, MSI-X)"
    );
    assert_eq!(n(&report, "verify_errors"), 0);
    assert!(
        n(&report, "frames") > 500_000,
        "streaming resumed after the reset"
    );
    assert_eq!(
        n(&report, "device_produced"),
        n(&report, "device_delivered")
            + n(&report, "device_dropped")
            + n(&report, "frames_discarded_at_reset")
            + n(&report, "device_pending"),
        "every frame of every epoch is accounted for"
    );
    assert_eq!(n(&report, "device_held_after"), 0);
}

/// spec: [4-3] [6.13-1] through QEMU's generic device, on virtio-mmio.
#[test]
fn e2e_microvm_needs_reset_arrives_as_a_configuration_interrupt_over_mmio() {
    let (ok, report) = vdaq_scenario_on("microvm", "needs-reset.toml", &["--rate", "1000000"]);
    assert!(ok, "{}", report["failure"]);
    assert_eq!(report["transport"], "mmio");
    assert!(
        n(&report, "config_interrupts") >= 1,
        "InterruptStatus showed a configuration change"
    );
    assert!(n(&report, "reset_recoveries") >= 1);
    assert_eq!(n(&report, "verify_errors"), 0);
}

#[test]
fn e2e_delayed_completions_arrive_late_and_complete() {
    let (ok, report) = vdaq_scenario("delay.toml", &[]);
    assert!(ok, "{}", report["failure"]);
    assert_sound(&report);
    assert!(
        n(&report, "latency_max_us") >= 250_000,
        "buffers waited out the 300 ms delay: max latency {} µs",
        n(&report, "latency_max_us")
    );
}

#[test]
fn e2e_set_signal_switches_the_stream_without_mixing_signals() {
    let (ok, report) = vdaq_scenario("set-signal.toml", &["--rate", "1000000"]);
    assert!(ok, "{}", report["failure"]);
    assert_sound(&report);
    assert!(
        n(&report, "frames") > 600_000,
        "the run went past both switches"
    );
}

/// The Linux guest's kernel and initramfs (`libiio`: the one with the libiio tools), each
/// built once for all tests of this binary (the launcher's own `tools::linux_image`).
fn linux_image(libiio: bool) -> &'static (String, String) {
    static IMAGES: [std::sync::OnceLock<(String, String)>; 2] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    IMAGES[usize::from(libiio)].get_or_init(|| match tools::linux_image(None, libiio) {
        Ok(vdaq_launcher::session::GuestImage::Linux { kernel, initrd }) => {
            (kernel.display().to_string(), initrd.display().to_string())
        }
        other => panic!("the Linux guest image: {other:?}"),
    })
}

/// The Linux guest: `vdaq --guest linux` with `args`.
fn linux(args: &[&str]) -> (bool, Value) {
    linux_with(false, args)
}

/// The Linux guest with the libiio tools in its image.
fn linux_libiio(args: &[&str]) -> (bool, Value) {
    linux_with(true, args)
}

fn linux_with(libiio: bool, args: &[&str]) -> (bool, Value) {
    let (kernel, initrd) = linux_image(libiio);
    let mut all = vec![
        "--guest",
        "linux",
        "--linux-kernel",
        kernel,
        "--linux-initrd",
        initrd,
        "--accel",
        "tcg",
    ];
    all.extend_from_slice(args);
    vdaq(&all)
}

#[test]
fn e2e_linux_q35_pci_io_uring_stream_verifies_every_sample() {
    let (ok, report) = linux(&[
        "--machine",
        "q35",
        "--duration",
        "2",
        "--rate",
        "500000",
        "--reads",
        "16",
    ]);
    assert!(ok);
    assert_sound(&report);
    assert_eq!(report["transport"], "pci");
    assert_eq!(report["mode"], "stream");
    assert!(
        n(&report, "completions") > 10,
        "a stream, not a handful of reads"
    );
    assert!(
        n(&report, "data_notifications") > 0,
        "the driver counts the notifications it sends"
    );
    // 16 reads of 64 KiB keep up with 4 MB/s (reads sent through an io-wq worker did not:
    // they lost most of the stream).
    assert!(
        n(&report, "device_dropped") * 20 < n(&report, "device_produced"),
        "under 5 % of the stream dropped"
    );
}

#[test]
fn e2e_linux_microvm_mmio_io_uring_stream_verifies_every_sample() {
    // Plain reads, each pinned by the driver; the q35 run reads into registered buffers.
    let (ok, report) = linux(&[
        "--plain-reads",
        "--machine",
        "microvm",
        "--duration",
        "2",
        "--rate",
        "500000",
        "--reads",
        "16",
    ]);
    assert!(ok);
    assert_sound(&report);
    assert_eq!(report["transport"], "mmio");
    assert!(
        n(&report, "device_dropped") * 20 < n(&report, "device_produced"),
        "under 5 % of the stream dropped"
    );
}

/// The kernel driver resets the card on NEEDS_RESET and takes every read back; the
/// application accounts the epoch with the counters the driver read before the reset, and
/// streams again.
#[test]
fn e2e_linux_needs_reset_is_recovered_and_streaming_resumes() {
    let path = format!(
        "{}/../scenarios/needs-reset.toml",
        env!("CARGO_MANIFEST_DIR")
    );
    let (ok, report) = linux(&[
        "--machine",
        "q35",
        "--duration",
        "1.5",
        "--rate",
        "1000000",
        "--scenario",
        &path,
    ]);
    assert!(ok, "{}", report["failure"]);
    assert!(n(&report, "reset_recoveries") >= 1, "{report}");
    assert_eq!(n(&report, "verify_errors"), 0);
    assert!(
        n(&report, "frames") > 500_000,
        "streaming resumed after the reset"
    );
    assert_eq!(
        n(&report, "device_produced"),
        n(&report, "device_delivered")
            + n(&report, "device_dropped")
            + n(&report, "frames_discarded_at_reset")
            + n(&report, "device_pending"),
        "every frame of every epoch is accounted for"
    );
    assert_eq!(n(&report, "device_held_after"), 0);
}

#[test]
fn e2e_linux_cancelled_reads_all_come_back() {
    let (ok, report) = linux(&[
        "--mode",
        "cancel",
        "--duration",
        "2",
        "--rate",
        "500000",
        "--reads",
        "16",
    ]);
    assert!(ok);
    assert_sound(&report);
    assert_eq!(report["mode"], "cancel");
}

#[test]
fn e2e_linux_close_with_reads_pending_gets_every_read_back() {
    let (ok, report) = linux(&[
        "--mode",
        "close-pending",
        "--duration",
        "2",
        "--rate",
        "500000",
        "--reads",
        "16",
    ]);
    assert!(ok);
    assert_sound(&report);
    assert!(
        n(&report, "shutdown_in_flight") > 0,
        "closed with reads pending in the device"
    );
}

#[test]
fn e2e_linux_driver_removal_with_reads_in_flight_returns_every_read_then_rebinds() {
    // sysfs unbind runs the driver's removal path (module unload and hot-unplug run the same):
    // every read in flight comes back, the open file gets ENODEV/POLLHUP, the driver binds
    // again and reads; then the module is unloaded.
    let (ok, report) = linux(&["--mode", "unbind", "--reads", "16"]);
    assert!(ok, "guest verdict: {}", report["failure"]);
    assert_eq!(report["pass"], true);
    assert_eq!(n(&report, "shutdown_in_flight"), 16);
    assert_eq!(
        n(&report, "shutdown_returned"),
        16,
        "no read lost at removal"
    );
}

#[test]
fn e2e_linux_hot_unplug_with_reads_in_flight_then_backend_restart_and_replug() {
    // q35, the card behind a hot-pluggable PCIe root port: with 16 reads posted, the launcher
    // unplugs it (QMP device_del), restarts the backend and plugs a card in again; every read
    // comes back, the driver binds the new card and reads from it, QEMU never restarts.
    let (ok, report) = linux(&["--mode", "unplug", "--reads", "16"]);
    assert!(ok, "guest verdict: {}", report["failure"]);
    assert_eq!(report["pass"], true);
    assert_eq!(n(&report, "shutdown_in_flight"), 16);
    assert_eq!(
        n(&report, "shutdown_returned"),
        16,
        "no read lost at unplug"
    );
}

#[test]
fn e2e_linux_overrun_reports_every_dropped_sample() {
    let (ok, report) = linux(&[
        "--mode",
        "overrun",
        "--duration",
        "2",
        "--rate",
        "1000000",
        "--reads",
        "8",
    ]);
    assert!(ok);
    assert_sound(&report);
    assert!(
        n(&report, "dropped_frames") > 0,
        "the slow consumer overran"
    );
    assert_eq!(
        n(&report, "overrun_event_frames"),
        n(&report, "device_dropped"),
        "OVERRUN events add up to the device's drops"
    );
}

#[test]
fn e2e_linux_bare_metal_only_options_are_refused_with_one_line() {
    let output = Command::new(env!("CARGO_BIN_EXE_vdaq"))
        .args(["--guest", "linux", "--hash"])
        .stdin(Stdio::null())
        .output()
        .expect("run vdaq");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--hash") && stderr.contains("bare-metal"),
        "{stderr}"
    );
    for (args, needle) in [
        (&["--mode", "cancel"][..], "--guest linux"),
        (&["--mode", "unbind"][..], "--guest linux"),
        (&["--mode", "iio"][..], "--guest linux"),
        (&["--iiod", "30431"][..], "--guest linux"),
        (&["--guest", "linux", "--iiod", "0"][..], "--iiod 30431"),
        (
            &[
                "--guest",
                "linux",
                "--machine",
                "microvm",
                "--mode",
                "unplug",
            ][..],
            "--machine q35",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_vdaq"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run vdaq");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn e2e_linux_iio_device_through_sysfs_verifies_every_sample_and_follows_the_rate() {
    let (ok, report) = linux(&["--mode", "iio-raw", "--duration", "2", "--rate", "50000"]);
    assert!(ok, "guest verdict: {}", report["failure"]);
    assert_eq!(report["pass"], true);
    assert!(
        n(&report, "frames") >= 10_000,
        "captured through /dev/iio:deviceN"
    );
    assert_eq!(n(&report, "verify_errors"), 0);
    assert_eq!(n(&report, "dropped_frames"), 0);
}

#[test]
fn e2e_linux_libiio_tools_capture_verify_and_change_the_rate() {
    let (ok, report) = linux_libiio(&["--mode", "iio", "--duration", "2", "--rate", "50000"]);
    assert!(ok, "guest verdict: {}", report["failure"]);
    assert_eq!(report["pass"], true);
    // The first capture: every channel and the timestamp, half the duration at 50 kHz.
    assert!(n(&report, "frames") >= 50_000, "iio_readdev captured");
    assert_eq!(n(&report, "samples"), 4 * n(&report, "frames"));
    assert_eq!(n(&report, "verify_errors"), 0);
    assert_eq!(n(&report, "dropped_frames"), 0, "no overrun at this rate");
}

#[test]
fn e2e_linux_libiio_overrun_is_counted_by_the_driver() {
    // S32 so a gap of any size is unambiguous; a 200 ms stall with a 4096-frame FIFO.
    let (ok, report) = linux_libiio(&[
        "--mode",
        "iio",
        "--duration",
        "2",
        "--rate",
        "50000",
        "--format",
        "s32",
        "--fifo-frames",
        "4096",
        "--scenario",
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../scenarios/stall.toml")
            .display()
            .to_string(),
    ]);
    assert!(ok, "guest verdict: {}", report["failure"]);
    assert!(n(&report, "dropped_frames") > 0, "the stall dropped frames");
    // Every frame missing from the capture is one the driver counted as dropped.
    assert!(n(&report, "dropped_frames") <= n(&report, "overrun_event_frames"));
}

/// The host's libiio tools, the ones `images/build-linux.sh --libiio` writes.
fn host_iio_tool(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../build/linux/userland/bin")
        .join(name)
}

#[test]
fn e2e_linux_iiod_serves_the_card_to_the_hosts_libiio() {
    use std::io::{BufRead, BufReader};
    use vdaq_wire::scan::{ScanLayout, ScanVerifier};

    let (kernel, initrd) = linux_image(true);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vdaq"))
        .args(["--guest", "linux", "--accel", "tcg", "--rate", "20000"])
        .args(["--linux-kernel", kernel, "--linux-initrd", initrd])
        .args(["--iiod", &port.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vdaq --iiod");
    let stderr = child.stderr.take().expect("stderr");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("vdaq --iiod: {line}");
            if line.contains("iiod serves the card") {
                let _ = ready_tx.send(());
            }
        }
    });
    let ready = ready_rx.recv_timeout(Duration::from_secs(90));
    let uri = format!("ip:127.0.0.1:{port}");
    let result = ready
        .map_err(|_| "iiod never came up".to_string())
        .and_then(|()| {
            let info = Command::new(host_iio_tool("iio_info"))
                .args(["-u", &uri])
                .output()
                .map_err(|e| e.to_string())?;
            let info = String::from_utf8_lossy(&info.stdout).into_owned();
            eprintln!("{info}");
            if !info.contains("vdaq") || !info.contains("voltage3") {
                return Err(format!(
                    "iio_info lists no vdaq card with 4 channels:\n{info}"
                ));
            }
            let capture = Command::new(host_iio_tool("iio_readdev"))
                .args(["-u", &uri, "-b", "4096", "-s", "40000", "vdaq"])
                .output()
                .map_err(|e| e.to_string())?;
            Ok(capture.stdout)
        });
    // Ctrl-C ends the serving session; the launcher then exits 0.
    // SAFETY: kill(2) on our own child's pid; no memory involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().expect("vdaq exits");
    let capture = result.unwrap_or_else(|e| panic!("{e}"));
    let layout = ScanLayout {
        format: vdaq_wire::SampleFormat::S16,
        card_channels: 4,
        enabled: 0b1111,
        timestamp: true,
    };
    assert_eq!(
        capture.len(),
        40_000 * layout.scan_bytes(),
        "iio_readdev -s 40000"
    );
    let mut verifier = ScanVerifier::new(layout);
    for scan in capture.chunks_exact(layout.scan_bytes()) {
        verifier
            .check(scan)
            .expect("every sample through iiod is the counter's");
    }
    let stats = verifier.stats();
    assert_eq!((stats.scans, stats.gaps), (40_000, 0));
    let interval = stats.mean_frame_interval_ns().expect("timestamps");
    assert!(
        (interval - 50_000.0).abs() < 5_000.0,
        "20 kHz: {interval} ns per frame"
    );
    assert!(status.success(), "vdaq --iiod after Ctrl-C: {status}");
}
