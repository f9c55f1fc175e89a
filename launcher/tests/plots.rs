//! End to end: the charts `vdaq --plot`, `vdaq bench --plot` and `vhost-device-daq plot`
//! draw are valid PNGs of the size asked for, and what they mark comes from the run: the
//! overruns and dropped frames the waveform marks are those the guest verified, its triggers
//! those the scenario fired, the latency histogram counts every buffer that carried frames.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

mod common;
use common::{n, vdaq};

/// The size of a PNG, which must decode.
fn png_size(path: &Path) -> (u32, u32) {
    let image = image::open(path).unwrap_or_else(|e| panic!("{} is no PNG: {e}", path.display()));
    (image.width(), image.height())
}

fn plots_json(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("plots.json")).expect("plots.json written");
    serde_json::from_str(&text).expect("plots.json is JSON")
}

/// The backend binary cargo built beside vdaq.
fn backend() -> std::path::PathBuf {
    Path::new(env!("CARGO_BIN_EXE_vdaq")).with_file_name("vhost-device-daq")
}

#[test]
fn e2e_plot_marks_the_overruns_the_guest_verified() {
    let dir = tempfile::tempdir().expect("temp dir");
    let recording = dir.path().join("overrun.vdaqrec");
    let charts = dir.path().join("charts");
    let (ok, report) = vdaq(&[
        "--accel",
        "tcg",
        "--mode",
        "overrun",
        "--duration",
        "1.5",
        "--reads",
        "4",
        "--rate",
        "200000",
        "--channels",
        "2",
        "--record",
        recording.to_str().expect("utf-8"),
        "--plot",
        charts.to_str().expect("utf-8"),
    ]);
    assert!(ok, "run passed: {}", report["failure"]);
    assert!(n(&report, "overrun_buffers") > 0, "the run overran");
    assert_eq!(png_size(&charts.join("latency.png")), (900, 450));
    assert_eq!(png_size(&charts.join("throughput.png")), (900, 400));
    assert_eq!(png_size(&charts.join("waveform.png")), (1200, 380));
    let plots = plots_json(&charts);
    let waveform = &plots["waveform"];
    assert_eq!(
        n(waveform, "overruns"),
        n(&report, "overrun_buffers"),
        "every overrun the guest saw is marked, and no other"
    );
    assert_eq!(
        n(waveform, "dropped_frames"),
        n(&report, "dropped_frames"),
        "the marked gaps hold exactly the frames the headers reported dropped"
    );
    assert_eq!(
        n(waveform, "samples"),
        n(&report, "samples"),
        "every verified sample is in the waveform"
    );
    assert_eq!(
        n(&plots["latency"], "buffers"),
        n(&report, "completions") - n(&report, "empty_completions"),
        "the histogram counts every buffer that carried frames"
    );
    assert!(n(&plots["throughput"], "intervals") >= 5, "{plots}");
}

#[test]
fn e2e_plot_shows_the_waveform_around_a_scripted_trigger() {
    let dir = tempfile::tempdir().expect("temp dir");
    let recording = dir.path().join("trigger.vdaqrec");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/trigger.toml");
    let (ok, report) = vdaq(&[
        "--accel",
        "tcg",
        "--signal",
        "sine",
        "--rate",
        "48000",
        "--channels",
        "2",
        "--duration",
        "1.5",
        "--scenario",
        scenario.to_str().expect("utf-8"),
        "--record",
        recording.to_str().expect("utf-8"),
    ]);
    assert!(ok, "run passed: {}", report["failure"]);
    let png = dir.path().join("trigger.png");
    let output = Command::new(backend())
        .args([
            "plot",
            "--trigger",
            "2",
            "--window",
            "2000",
            "--size",
            "800x400",
            "--json",
        ])
        .arg(&recording)
        .arg("-o")
        .arg(&png)
        .output()
        .expect("run the backend's plot");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let drawn: Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    let waveform = &drawn["waveform"];
    assert_eq!(png_size(&png), (800, 400));
    assert_eq!(n(waveform, "triggers"), 1, "the second trigger, in view");
    let frames = &waveform["frames"];
    assert_eq!(n(frames, "end") - n(frames, "start"), 2000);
    // The scenario fires at 900 ms: the view starts a quarter-window before it.
    let trigger = n(frames, "start") + 500;
    assert!(
        (40_000..50_000).contains(&trigger),
        "trigger at frame {trigger}, 0.9 s × 48 kHz ≈ 43 200 plus the time to START"
    );
    // Asking for a third trigger names how many there are.
    let output = Command::new(backend())
        .args(["plot", "--trigger", "3"])
        .arg(&recording)
        .output()
        .expect("run the backend's plot");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("holds 2 trigger(s)"), "{stderr}");
}

#[test]
fn e2e_record_refuses_to_append_to_an_existing_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let recording = dir.path().join("old.vdaqrec");
    std::fs::write(&recording, b"VDAQREC1").expect("written");
    let output = Command::new(env!("CARGO_BIN_EXE_vdaq"))
        .args(["--accel", "tcg", "--record"])
        .arg(&recording)
        .output()
        .expect("run vdaq");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("the file exists; remove it or name a new one"),
        "{stderr}"
    );
}

#[test]
fn e2e_bench_plot_draws_one_bar_per_shape() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_vdaq"))
        .args(["bench", "--accel", "tcg", "--duration", "0.3", "--plot"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run vdaq bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success());
    assert_eq!(png_size(&dir.path().join("bench.png")), (1100, 500));
    let plots = plots_json(dir.path());
    // One bar per row of the sweep table (TCG only here: KVM rows only on hardware KVM).
    let rows = stdout
        .lines()
        .filter(|line| line.trim_start().starts_with("bare-metal"))
        .count() as u64;
    assert!(rows >= 4, "the sweep printed its rows");
    assert_eq!(n(&plots["sweep"], "bars"), rows);
    assert_eq!(n(&plots["sweep"], "groups"), 4);
}
