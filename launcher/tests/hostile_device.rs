//! End to end: the card breaks the protocol on purpose (scenario actions of
//! `vhost-device/src/model/violations.rs`, see scenarios/README.md), and the reference guest
//! and the Linux guest (kernel driver and io_uring application) detect each violation, never crashes or hangs, recovers where a reset can (and says what
//! happened), or fails the run at once with a `failure` that names the violation. Nothing
//! stays pending: the device holds no buffer at the end.

use serde_json::Value;

mod common;
use common::{n, vdaq};

/// A one-step scenario (`at_ms` 300, the rest as given) in a file of its own.
fn scenario_file(name: &str, steps: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vdaq-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scenario dir");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, steps).expect("scenario file");
    path
}

/// Runs the reference guest (q35, TCG) for 1.5 s with `action` (and its `fields`) at 300 ms.
fn hostile(action: &str, fields: &str) -> (bool, Value) {
    hostile_steps(
        Guest::BareMetal,
        &name_of(action, fields),
        &step(action, fields),
    )
}

/// [`hostile`] with the Linux guest.
fn hostile_linux(action: &str, fields: &str) -> (bool, Value) {
    hostile_steps(
        Guest::Linux,
        &name_of(action, fields),
        &step(action, fields),
    )
}

fn name_of(action: &str, fields: &str) -> String {
    format!("{action}-{}", fields.replace(['"', ' ', '='], ""))
}

fn step(action: &str, fields: &str) -> String {
    format!("[[step]]\nat_ms = 300\naction = \"{action}\"\n{fields}\n")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Guest {
    BareMetal,
    Linux,
}

/// The Linux guest's kernel and initramfs, built once for all tests of this binary.
fn linux_image() -> &'static (String, String) {
    static IMAGE: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| match vdaq_launcher::tools::linux_image(None, false) {
        Ok(vdaq_launcher::session::GuestImage::Linux { kernel, initrd }) => {
            (kernel.display().to_string(), initrd.display().to_string())
        }
        other => panic!("the Linux guest image: {other:?}"),
    })
}

fn hostile_steps(guest: Guest, name: &str, steps: &str) -> (bool, Value) {
    let suffix = if guest == Guest::Linux { "-linux" } else { "" };
    let path = scenario_file(&format!("{name}{suffix}"), steps);
    let path = path.to_str().expect("utf-8 path");
    let mut args = vec![
        "--machine",
        "q35",
        "--accel",
        "tcg",
        "--duration",
        "1.5",
        "--scenario",
        path,
    ];
    if guest == Guest::Linux {
        let (kernel, initrd) = linux_image();
        args.extend([
            "--guest",
            "linux",
            "--linux-kernel",
            kernel.as_str(),
            "--linux-initrd",
            initrd.as_str(),
        ]);
    }
    vdaq(&args)
}

/// The run failed, naming one of `names`, with the violation counted.
fn assert_named(ok: bool, report: &Value, names: &[&str]) {
    assert!(!ok, "a violation must not pass: {report}");
    assert_eq!(report["pass"], false);
    let failure = report["failure"].as_str().expect("failure");
    assert!(
        names.contains(&failure),
        "failure {failure:?}, expected one of {names:?}"
    );
}

/// The run failed naming `name`, the driver counted a violation, and the device holds nothing.
fn assert_violation(ok: bool, report: &Value, names: &[&str]) {
    assert_named(ok, report, names);
    assert!(n(report, "protocol_violations") >= 1, "{report}");
}

/// Interrupts a guest takes at least from a storm of 20 000, sent 20 per clock tick (the
/// frontend merges signals that come faster than it looks: at least one per burst).
const STORM_SEEN: u64 = 500;

const NOT_IN_FLIGHT: &str = "device violation: used id names a buffer not in flight";
const OUT_OF_ORDER: &str = "device violation: read completed out of order";

/// A ring the driver cannot trust: it resets the device, takes every read back and streams
/// again; the run still fails, naming the violation.
fn assert_recovered_ring(ok: bool, report: &Value, names: &[&str]) {
    assert_violation(ok, report, names);
    assert!(
        n(report, "reset_recoveries") >= 1,
        "the driver reset the device: {report}"
    );
    assert_eq!(n(report, "device_held_after"), 0);
    assert_eq!(
        n(report, "shutdown_returned"),
        n(report, "shutdown_in_flight"),
        "shutdown got every read back"
    );
}

#[test]
fn e2e_hostile_used_length_over_the_buffer_is_named() {
    let (ok, report) = hostile("used_len_over", "");
    assert_violation(
        ok,
        &report,
        &["device violation: used length beyond the buffer"],
    );
    assert_eq!(n(&report, "device_held_after"), 0);
}

#[test]
fn e2e_hostile_used_length_under_the_header_is_named() {
    let (ok, report) = hostile("used_len_under_header", "");
    assert_violation(
        ok,
        &report,
        &["device violation: used length under the header"],
    );
    assert_eq!(n(&report, "device_held_after"), 0);
}

#[test]
fn e2e_hostile_used_id_out_of_range_is_recovered_by_a_reset() {
    let (ok, report) = hostile("used_id_out_of_range", "");
    assert_recovered_ring(
        ok,
        &report,
        &["device violation: used id names no descriptor"],
    );
}

#[test]
fn e2e_hostile_used_id_not_in_flight_is_recovered_by_a_reset() {
    let (ok, report) = hostile("used_id_not_in_flight", "");
    // A descriptor the device does not hold may be one the driver posted a moment ago: then
    // the driver meets it as a read completed before its elders.
    assert_recovered_ring(ok, &report, &[NOT_IN_FLIGHT, OUT_OF_ORDER]);
}

#[test]
fn e2e_hostile_buffer_completed_twice_is_recovered_by_a_reset() {
    let (ok, report) = hostile("complete_twice", "");
    assert_recovered_ring(ok, &report, &[NOT_IN_FLIGHT, OUT_OF_ORDER]);
}

#[test]
fn e2e_hostile_used_index_jump_is_recovered_by_a_reset() {
    let (ok, report) = hostile("used_index_jump", "");
    assert_recovered_ring(ok, &report, &[NOT_IN_FLIGHT, OUT_OF_ORDER]);
}

#[test]
fn e2e_hostile_header_lies_are_each_named() {
    for (field, names) in [
        (
            "frame_count",
            &["device violation: header frame count disagrees with the used length"][..],
        ),
        (
            "channels",
            &["device violation: header format or channels contradict the configuration"],
        ),
        (
            "format",
            &["device violation: header format or channels contradict the configuration"],
        ),
        // The driver numbers completions itself: a skipped sequence is a read it cannot
        // trust (a stale used entry looks the same), kept until it resets the device.
        ("sequence", &[OUT_OF_ORDER]),
        (
            "first_frame",
            &["frames missing or repeated without a reported drop"],
        ),
        (
            "timestamp",
            &["buffer timestamp earlier than the previous one"],
        ),
    ] {
        let (ok, report) = hostile("bad_header", &format!("field = \"{field}\""));
        assert_named(ok, &report, names);
        assert_eq!(n(&report, "device_held_after"), 0, "{field}");
    }
}

#[test]
fn e2e_hostile_replies_short_long_and_of_undefined_status_are_named() {
    for (action, name) in [
        (
            "reply_short",
            "device violation: command reply shorter than its header",
        ),
        (
            "reply_long",
            "device violation: command reply beyond its area",
        ),
        (
            "reply_bad_status",
            "device violation: command reply with undefined status",
        ),
    ] {
        // The next command after 300 ms is shutdown's STOP.
        let (ok, report) = hostile(action, "");
        assert_violation(ok, &report, &[name]);
    }
}

#[test]
fn e2e_hostile_command_never_answered_times_out_and_is_named() {
    let (ok, report) = hostile("reply_never", "");
    assert_violation(ok, &report, &["device violation: command never answered"]);
    // Shutdown's STOP was the command: the driver reset the device and took every read back.
    assert!(n(&report, "shutdown_in_flight") > 0, "{report}");
    assert_eq!(
        n(&report, "shutdown_returned"),
        n(&report, "shutdown_in_flight")
    );
}

#[test]
fn e2e_hostile_impossible_configuration_space_is_named() {
    for field in ["channels", "format", "firmware"] {
        let (ok, report) = hostile("bad_config", &format!("field = \"{field}\""));
        assert_violation(
            ok,
            &report,
            &["device violation: configuration space holds impossible values"],
        );
        assert!(n(&report, "config_interrupts") >= 1, "{field}: notified");
    }
}

#[test]
fn e2e_hostile_unknown_events_are_ignored_and_counted() {
    let (ok, report) = hostile("unknown_event", "");
    assert!(ok, "{}", report["failure"]);
    assert_eq!(n(&report, "unknown_events"), 1);
    assert_eq!(n(&report, "protocol_violations"), 0);
}

#[test]
fn e2e_hostile_interrupt_storm_is_survived() {
    let (ok, report) = hostile("interrupt_storm", "count = 20000");
    assert!(ok, "{}", report["failure"]);
    assert!(
        n(&report, "interrupts") >= STORM_SEEN,
        "the storm reached the guest: {report}"
    );
    assert_eq!(n(&report, "verify_errors"), 0);
    assert_eq!(n(&report, "device_held_after"), 0);
}

#[test]
fn e2e_hostile_silence_is_found_by_the_watchdog_and_commands_still_complete() {
    // Silence while streaming (the data watchdog), and again over shutdown's commands (their
    // replies are found without interrupts).
    let (ok, report) = hostile_steps(
        Guest::BareMetal,
        "silence",
        "[[step]]\nat_ms = 300\naction = \"no_interrupts\"\nduration_ms = 300\n\
         [[step]]\nat_ms = 1200\naction = \"no_interrupts\"\nduration_ms = 5000\n",
    );
    assert!(ok, "{}", report["failure"]);
    assert!(n(&report, "watchdog_recoveries") >= 1, "{report}");
    assert_eq!(n(&report, "verify_errors"), 0);
    assert_eq!(n(&report, "device_held_after"), 0);
}

// The Linux guest: the kernel driver detects, counts (sysfs, VDAQ_IOC_GET_STATS) and names
// each violation; reads it cannot trust stay pinned until it resets the device; the io_uring
// application fails the run at once naming it, and every read comes back.

/// The Linux run failed naming one of `names`, and shutdown got every read back.
fn assert_linux_named(ok: bool, report: &Value, names: &[&str]) {
    assert_named(ok, report, names);
    assert_eq!(n(report, "device_held_after"), 0);
    assert_eq!(
        n(report, "shutdown_returned"),
        n(report, "shutdown_in_flight"),
        "every read came back"
    );
}

const RING_BROKEN: &str =
    "device violation: used id out of range or naming no buffer (ring broken)";

#[test]
fn e2e_linux_hostile_used_ring_violations_are_named_and_every_read_comes_back() {
    for action in [
        "used_id_out_of_range",
        "used_id_not_in_flight",
        "complete_twice",
        "used_index_jump",
    ] {
        let (ok, report) = hostile_linux(action, "");
        // The virtio core refuses an id out of range or naming no head; a stale entry naming
        // a read in flight is one completed before its elders.
        assert_linux_named(ok, &report, &[RING_BROKEN, OUT_OF_ORDER]);
        assert!(n(&report, "protocol_violations") >= 1, "{action}");
    }
}

#[test]
fn e2e_linux_hostile_lying_completions_are_named() {
    for (action, fields, name) in [
        (
            "used_len_over",
            "",
            "device violation: used length beyond the buffer",
        ),
        (
            "used_len_under_header",
            "",
            "device violation: used length under the header",
        ),
        (
            "bad_header",
            "field = \"frame_count\"",
            "device violation: header frame count disagrees with the used length",
        ),
        (
            "bad_header",
            "field = \"channels\"",
            "device violation: header format or channels contradict the configuration",
        ),
        (
            "bad_header",
            "field = \"format\"",
            "device violation: header format or channels contradict the configuration",
        ),
        ("bad_header", "field = \"sequence\"", OUT_OF_ORDER),
        (
            "bad_header",
            "field = \"timestamp\"",
            "buffer timestamp earlier than the previous one",
        ),
    ] {
        let (ok, report) = hostile_linux(action, fields);
        assert_linux_named(ok, &report, &[name]);
    }
}

#[test]
fn e2e_linux_hostile_replies_and_config_space_are_named() {
    for (action, fields, name) in [
        (
            "reply_short",
            "",
            "device violation: command reply shorter than its header",
        ),
        (
            "reply_long",
            "",
            "device violation: command reply beyond its area",
        ),
        (
            "reply_bad_status",
            "",
            "device violation: command reply with undefined status",
        ),
        (
            "reply_never",
            "",
            "device violation: command never answered",
        ),
        (
            "bad_config",
            "field = \"channels\"",
            "device violation: configuration space holds impossible values",
        ),
    ] {
        let (ok, report) = hostile_linux(action, fields);
        assert_linux_named(ok, &report, &[name]);
        assert!(n(&report, "protocol_violations") >= 1, "{action}");
    }
}

#[test]
fn e2e_linux_hostile_unknown_events_storms_and_silence_are_survived() {
    let (ok, report) = hostile_linux("unknown_event", "");
    assert!(ok, "{}", report["failure"]);
    assert_eq!(n(&report, "unknown_events"), 1);
    assert_eq!(n(&report, "protocol_violations"), 0);
    assert_eq!(n(&report, "device_held_after"), 0);
    let (ok, report) = hostile_linux("interrupt_storm", "count = 20000");
    assert!(ok, "{}", report["failure"]);
    // Linux's virtio core drops an interrupt with nothing used before the driver's callback
    // (vring_interrupt: IRQ_NONE), so the driver's count cannot show the storm; surviving
    // it with every sample verified is what is checked here.
    assert_eq!(n(&report, "verify_errors"), 0);
    assert_eq!(n(&report, "device_held_after"), 0);
    let (ok, report) = hostile_steps(
        Guest::Linux,
        "silence",
        "[[step]]\nat_ms = 300\naction = \"no_interrupts\"\nduration_ms = 300\n\
         [[step]]\nat_ms = 1200\naction = \"no_interrupts\"\nduration_ms = 5000\n",
    );
    assert!(ok, "{}", report["failure"]);
    assert!(n(&report, "watchdog_recoveries") >= 1, "{report}");
    assert_eq!(n(&report, "device_held_after"), 0);
}
