//! Helpers the launcher's end-to-end test files share.

#![allow(dead_code)] // each test file uses its own share of these

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Runs `vdaq ARGS --json`: (exit status ok, the guest's report); stderr is echoed.
pub fn vdaq(args: &[&str]) -> (bool, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_vdaq"))
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .expect("run vdaq");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str::<Value>(line).ok())
        .unwrap_or_else(|| panic!("no report from vdaq {args:?}; stderr:\n{stderr}"));
    eprintln!("vdaq {args:?}:\n{stderr}");
    (output.status.success(), report)
}

/// `field` of a report (or any JSON object) as a number.
pub fn n(value: &Value, field: &str) -> u64 {
    value[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {value}"))
}

/// Pids of processes whose command line mentions every one of `needles`.
pub fn processes_mentioning(needles: &[&str]) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(Path::new("/proc").join(pid.to_string()).join("cmdline"))
            .unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if needles.iter().all(|needle| cmdline.contains(needle)) {
            pids.push(pid);
        }
    }
    pids
}
