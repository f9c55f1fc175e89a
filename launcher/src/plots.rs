//! `--plot DIR`: charts of a run (the guest's latency histogram and throughput over time, and
//! the waveform when the backend recorded) or of a benchmark sweep, as PNG files, with what
//! each shows in `DIR/plots.json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use thiserror::Error;
use vdaq_launcher::session::RunOutcome;
use vdaq_plot::latency::{latency_histogram, Bucket};
use vdaq_plot::sweep::{sweep, Bar};
use vdaq_plot::throughput::{throughput, Progress};
use vdaq_plot::PlotError;

/// The latency histogram's size.
pub const LATENCY_SIZE: (u32, u32) = (900, 450);
/// The throughput chart's size.
pub const THROUGHPUT_SIZE: (u32, u32) = (900, 400);
/// The sweep chart's size.
pub const SWEEP_SIZE: (u32, u32) = (1100, 500);
/// Guest progress period while plotting: enough points for the throughput chart.
pub const PROGRESS_MS: u64 = 100;

/// A chart could not be made.
#[derive(Debug, Error)]
pub enum PlotsError {
    /// The directory could not be created or the summary not written.
    #[error("--plot {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A chart failed.
    #[error("--plot: {0}")]
    Plot(#[from] PlotError),
    /// The backend's `plot` failed on the recording.
    #[error("--plot: the waveform of {0} could not be drawn (see the backend's message above)")]
    Waveform(PathBuf),
}

/// Creates `dir` (and parents) for the charts.
pub fn prepare(dir: &Path) -> Result<(), PlotsError> {
    std::fs::create_dir_all(dir).map_err(|source| PlotsError::Dir {
        dir: dir.to_path_buf(),
        source,
    })
}

fn write_summary(dir: &Path, summary: &Value) -> Result<(), PlotsError> {
    let path = dir.join("plots.json");
    std::fs::write(&path, format!("{summary:#}\n"))
        .map_err(|source| PlotsError::Dir { dir: path, source })
}

/// Charts of one run into `dir`; `recording` is the backend's `--record` file, drawn by the
/// backend's own `plot` command. Prints one line per chart on stderr. Each chart is drawn on
/// its own: one that cannot be drawn does not keep the others (or plots.json) from being
/// written; the first failure is returned at the end.
pub fn run_charts(
    dir: &Path,
    outcome: &RunOutcome,
    backend: &Path,
    recording: Option<&Path>,
) -> Result<(), PlotsError> {
    let mut summary = serde_json::Map::new();
    let mut first_error: Option<PlotsError> = None;
    let report = outcome.report();
    let buckets: Vec<Bucket> = outcome
        .latency
        .iter()
        .map(|b| Bucket {
            low_us: b.low_us,
            high_us: b.high_us,
            count: b.count,
        })
        .collect();
    let (p50, p99, mb_s) = report.as_ref().map_or((0, 0, 0.0), |r| {
        (
            r.latency_p50_us,
            r.latency_p99_us,
            r.bytes as f64 / 1e6 / (r.guest_time_ns as f64 / 1e9).max(1e-9),
        )
    });
    let latency_png = dir.join("latency.png");
    match latency_histogram(
        &buckets,
        p50,
        p99,
        "latency: device timestamp of a buffer's first frame to its consumption",
        LATENCY_SIZE,
        &latency_png,
    ) {
        Ok(latency) => {
            eprintln!(
                "vdaq: wrote {} ({} buffers in {} buckets)",
                latency_png.display(),
                latency.buffers,
                latency.buckets
            );
            summary.insert("latency".into(), json!(latency));
        }
        Err(err) => {
            first_error.get_or_insert(err.into());
        }
    }
    let points: Vec<Progress> = outcome
        .progress
        .iter()
        .map(|&(guest_ms, bytes)| Progress { guest_ms, bytes })
        .collect();
    let throughput_png = dir.join("throughput.png");
    match throughput(
        &points,
        mb_s,
        "verified throughput over guest time",
        THROUGHPUT_SIZE,
        &throughput_png,
    ) {
        Ok(rate) => {
            eprintln!(
                "vdaq: wrote {} ({} intervals, peak {:.1} MB/s)",
                throughput_png.display(),
                rate.intervals,
                rate.peak_mb_s
            );
            summary.insert("throughput".into(), json!(rate));
        }
        Err(err) => {
            first_error.get_or_insert(err.into());
        }
    }
    if let Some(recording) = recording {
        match waveform_chart(dir, backend, recording) {
            Ok(waveform) => {
                summary.insert("waveform".into(), waveform);
            }
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    write_summary(dir, &Value::Object(summary))?;
    first_error.map_or(Ok(()), Err)
}

/// `dir/waveform.png` of `recording`, drawn by the backend's `plot`; what it shows.
fn waveform_chart(dir: &Path, backend: &Path, recording: &Path) -> Result<Value, PlotsError> {
    let waveform_png = dir.join("waveform.png");
    let output = Command::new(backend)
        .arg("plot")
        .arg(recording)
        .arg("-o")
        .arg(&waveform_png)
        .arg("--json")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|_| PlotsError::Waveform(recording.to_path_buf()))?;
    let drawn: Value = output
        .status
        .success()
        .then(|| serde_json::from_slice(&output.stdout).ok())
        .flatten()
        .ok_or_else(|| PlotsError::Waveform(recording.to_path_buf()))?;
    let waveform = drawn.get("waveform").cloned().unwrap_or(Value::Null);
    eprintln!(
        "vdaq: wrote {} ({} overrun(s), {} trigger(s), {} buffer boundaries)",
        waveform_png.display(),
        waveform["overruns"],
        waveform["triggers"],
        waveform["buffer_boundaries"]
    );
    Ok(waveform)
}

/// The benchmark sweep as `dir/bench.png`.
pub fn sweep_chart(dir: &Path, bars: &[Bar]) -> Result<(), PlotsError> {
    let png = dir.join("bench.png");
    let drawn = sweep(
        bars,
        "vdaq bench: verified throughput per shape (reads in flight × buffer)",
        SWEEP_SIZE,
        &png,
    )?;
    eprintln!(
        "vdaq bench: wrote {} ({} bars in {} groups)",
        png.display(),
        drawn.bars,
        drawn.groups
    );
    write_summary(dir, &json!({ "sweep": drawn, "bars": bars.len() }))
}
