//! Faults of the host side, end to end: the backend killed mid-stream, QEMU killed, the
//! backend's socket removed. The launcher says what happened, exits non-zero when the run could
//! not finish, never hangs, and leaves no process or run directory behind.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::processes_mentioning;

/// A running `vdaq` (bare metal, q35, TCG, a long paced run) whose backend and QEMU are up.
struct Run {
    child: Child,
    run_dir_prefix: String,
}

impl Run {
    fn start(duration: &str) -> Run {
        let child = Command::new(env!("CARGO_BIN_EXE_vdaq"))
            .args(["--accel", "tcg", "--duration", duration, "--rate", "100000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vdaq");
        let run = Run {
            run_dir_prefix: format!("vdaq-run-{}-", child.id()),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while run.backend().is_none() || run.qemu().is_none() {
            assert!(Instant::now() < deadline, "vdaq never started its children");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Streaming by now (the guest boots in well under a second).
        std::thread::sleep(Duration::from_secs(1));
        run
    }

    fn backend(&self) -> Option<u32> {
        processes_mentioning(&["vhost-device-daq", &self.run_dir_prefix])
            .first()
            .copied()
    }

    fn qemu(&self) -> Option<u32> {
        processes_mentioning(&["qemu-system-x86_64", &self.run_dir_prefix])
            .first()
            .copied()
    }

    fn socket(&self) -> PathBuf {
        std::fs::read_dir(std::env::temp_dir())
            .expect("tmp")
            .flatten()
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&self.run_dir_prefix)
            })
            .expect("the run directory")
            .path()
            .join("daq.sock")
    }

    /// Waits (bounded) for vdaq to end: (exit code, stderr); then checks nothing is left.
    fn finish(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("poll") {
                break status;
            }
            assert!(Instant::now() < deadline, "vdaq hung after the fault");
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            use std::io::Read;
            pipe.read_to_string(&mut stderr).expect("stderr");
        }
        eprintln!("{stderr}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !processes_mentioning(&[&self.run_dir_prefix]).is_empty() && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            processes_mentioning(&[&self.run_dir_prefix]),
            Vec::<u32>::new(),
            "no stray process"
        );
        let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .expect("tmp")
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&self.run_dir_prefix)
            })
            .collect();
        assert!(leftovers.is_empty(), "run directory removed: {leftovers:?}");
        (status.code(), stderr)
    }
}

fn kill(pid: u32) {
    // SAFETY: kill() with a valid signal on a process this test found by its command line.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

#[test]
fn e2e_backend_killed_mid_stream_is_reported_and_everything_is_cleaned_up() {
    let run = Run::start("60");
    kill(run.backend().expect("backend"));
    let (code, stderr) = run.finish();
    assert_eq!(code, Some(1), "a run cut short fails");
    assert_eq!(
        stderr
            .matches("aborted: the backend exited during the run")
            .count(),
        1,
        "said once, in one line"
    );
}

#[test]
fn e2e_qemu_killed_mid_stream_is_reported_and_everything_is_cleaned_up() {
    let run = Run::start("60");
    kill(run.qemu().expect("QEMU"));
    let (code, stderr) = run.finish();
    assert_eq!(code, Some(1), "a run cut short fails");
    assert!(
        stderr.contains("QEMU was killed by signal 9 before the guest reported"),
        "{stderr}"
    );
}

#[test]
fn e2e_removing_the_backend_socket_mid_stream_does_not_disturb_the_run() {
    let run = Run::start("4");
    std::fs::remove_file(run.socket()).expect("socket removed");
    let (code, stderr) = run.finish();
    assert_eq!(code, Some(0), "the connection was made; the run passes");
    assert!(stderr.contains("PASS"), "{stderr}");
}

#[test]
fn a_run_samples_the_backend_and_qemu_resources_when_asked() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_vdaq"))
        .args([
            "--machine",
            "microvm",
            "--accel",
            "tcg",
            "--duration",
            "1.5",
            "--sample-resources",
            "0.25",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run vdaq");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let header = stderr
        .lines()
        .find(|line| line.contains("resources, "))
        .unwrap_or_else(|| panic!("no resources line:\n{stderr}"));
    let samples: u64 = header
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a sample count");
    assert!(samples >= 4, "sampled through the run: {header}");
    for process in ["backend: RSS KiB", "QEMU: RSS KiB"] {
        let line = stderr
            .lines()
            .find(|line| line.trim_start().starts_with(process))
            .unwrap_or_else(|| panic!("no {process} line:\n{stderr}"));
        let first_rss: u64 = line
            .split_whitespace()
            .nth(3)
            .and_then(|n| n.parse().ok())
            .expect("a number");
        assert!(first_rss > 1000, "a real process's memory: {line}");
    }
}
