//! The command line as a user meets it: help, capabilities, misuse, sockets and signals.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;

fn daq() -> Command {
    Command::cargo_bin("vhost-device-daq").expect("binary built")
}

fn wait_for(path: &Path, present: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if path.exists() == present {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn help_names_the_socket_path_option() {
    let output = daq().arg("--help").output().expect("run");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("--socket-path"));
    assert!(help.contains("--print-capabilities"));
}

#[test]
fn print_capabilities_prints_json() {
    let output = daq().arg("--print-capabilities").output().expect("run");
    assert!(output.status.success());
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).expect("valid JSON");
    assert_eq!(value["type"], "daq");
}

#[test]
fn misuse_exits_2_with_one_line() {
    for args in [
        &["--no-such-option"][..],
        &[][..],
        &["-s", "/tmp/x.sock", "--rate", "0"][..],
        &["-s", "/tmp/x.sock", "--format", "u12"][..],
    ] {
        let output = daq().args(args).output().expect("run");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr:?}");
        assert!(stderr.starts_with("vhost-device-daq: "), "{stderr:?}");
    }
}

#[test]
fn an_unusable_socket_path_fails_at_once() {
    let output = daq()
        .args(["-s", "/nonexistent-dir/daq.sock"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent-dir/daq.sock"), "{stderr}");
}

#[test]
fn socket_count_serves_one_socket_per_device_and_sigterm_removes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("daq");
    let mut child = daq()
        .arg("--socket-path")
        .arg(&base)
        .args(["--socket-count", "2"])
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let sockets = [dir.path().join("daq0"), dir.path().join("daq1")];
    for socket in &sockets {
        assert!(wait_for(socket, true), "{} appears", socket.display());
    }
    // SAFETY: kill() with a pid we spawned and a valid signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().expect("wait");
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    for socket in &sockets {
        assert!(!socket.exists(), "{} removed", socket.display());
    }
}

#[test]
fn ctl_talks_to_a_running_backend_and_reports_bad_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("daq.sock");
    let control = dir.path().join("ctl.sock");
    let mut child = daq()
        .arg("--socket-path")
        .arg(&socket)
        .arg("--control-socket")
        .arg(&control)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    assert!(wait_for(&control, true), "control socket appears");
    let stats = daq()
        .arg("ctl")
        .arg(&control)
        .arg("stats")
        .output()
        .expect("ctl");
    assert!(stats.status.success());
    let value: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("JSON");
    assert_eq!(value["ok"], true);
    assert_eq!(value["state"], "Stopped");
    let inject = daq()
        .arg("ctl")
        .arg(&control)
        .args(["inject", "drop_interrupts", "count=3"])
        .output()
        .expect("ctl");
    assert!(
        inject.status.success(),
        "{}",
        String::from_utf8_lossy(&inject.stdout)
    );
    let bad = daq()
        .arg("ctl")
        .arg(&control)
        .args(["inject", "warp"])
        .output()
        .expect("ctl");
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stdout).contains("unknown action"));
    let missing = daq()
        .arg("ctl")
        .arg(dir.path().join("nope.sock"))
        .arg("stats")
        .output()
        .expect("ctl");
    assert_eq!(missing.status.code(), Some(2));
    // SAFETY: kill() with a pid we spawned and a valid signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    child.wait().expect("wait");
    assert!(!control.exists(), "control socket removed on SIGTERM");
}
