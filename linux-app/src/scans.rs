//! `vdaq-app verify-scans`: verifies a capture of IIO scans (what `iio_readdev` writes, what
//! `/dev/iio:deviceN` reads) against the card's counter signal, sample by sample, with the
//! wire crate's scan verifier, and prints `result k=v` lines for the image's report.

use std::io::{self, Read};
use std::path::PathBuf;

use clap::Parser;
use vdaq_wire::scan::{ScanLayout, ScanVerifier};
use vdaq_wire::SampleFormat;

/// Verify a capture of IIO scans of the counter signal.
#[derive(Parser, Debug)]
#[command(name = "vdaq-app verify-scans")]
pub struct ScanArgs {
    /// The capture ("-": standard input).
    file: PathBuf,
    /// Sample format of the card.
    #[arg(long, value_enum)]
    format: SampleFormat,
    /// Channels per frame on the card (the counter's stride), enabled or not.
    #[arg(long)]
    card_channels: u16,
    /// Channels in the scans, comma-separated card channel numbers.
    #[arg(long, value_delimiter = ',', required = true)]
    enabled: Vec<u16>,
    /// Each scan ends with IIO's 64-bit timestamp.
    #[arg(long)]
    timestamp: bool,
    /// Expected sample rate: the timestamps' mean spacing must be within 10 % of it.
    #[arg(long)]
    rate_hz: Option<u32>,
    /// Frames may be missing (an overrun); each gap is counted, not an error.
    #[arg(long)]
    allow_gaps: bool,
    /// At least this many scans must be in the capture.
    #[arg(long, default_value_t = 1)]
    min_scans: u64,
}

/// Runs the check; `Ok(true)` if the capture passed.
pub fn run(args: &ScanArgs) -> io::Result<bool> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    let mut enabled = 0u64;
    for &c in &args.enabled {
        if c >= args.card_channels || c >= 64 {
            return Err(invalid(format!(
                "--enabled {c}: the card has channels 0..{}",
                args.card_channels
            )));
        }
        enabled |= 1 << c;
    }
    let layout = ScanLayout {
        format: args.format,
        card_channels: args.card_channels,
        enabled,
        timestamp: args.timestamp,
    };
    let mut bytes = Vec::new();
    if args.file.as_os_str() == "-" {
        io::stdin().read_to_end(&mut bytes)?;
    } else {
        bytes = std::fs::read(&args.file)?;
    }
    let scan_bytes = layout.scan_bytes();
    let mut verifier = ScanVerifier::new(layout);
    let mut reported = 0;
    for scan in bytes.chunks_exact(scan_bytes) {
        if let Err(err) = verifier.check(scan) {
            reported += 1;
            if reported <= 3 {
                println!("vdaq-app: scan failed verification: {err:?}");
            }
        }
    }
    let stats = verifier.stats();
    let trailing = bytes.len() % scan_bytes;
    let interval = stats.mean_frame_interval_ns();
    println!(
        "vdaq-app: {} scans of {scan_bytes} bytes ({} samples), {} failed, {} gaps ({} frames \
         missing), {trailing} trailing bytes, mean frame interval {}",
        stats.scans,
        stats.samples,
        stats.errors,
        stats.gaps,
        stats.skipped_frames,
        interval.map_or("-".into(), |ns| format!("{ns:.0} ns")),
    );
    println!(
        "result frames={} samples={} bytes={} verify_errors={} dropped_frames={}",
        stats.scans,
        stats.samples,
        stats.samples * args.format.sample_bytes() as u64,
        stats.errors,
        stats.skipped_frames
    );
    let mut pass = stats.errors == 0 && trailing == 0 && stats.scans >= args.min_scans;
    if stats.gaps > 0 && !args.allow_gaps {
        println!("vdaq-app: frames are missing from the capture");
        pass = false;
    }
    if let Some(rate) = args.rate_hz {
        let expected = 1e9 / f64::from(rate.max(1));
        match interval {
            Some(ns) if (ns - expected).abs() <= 0.1 * expected => {}
            other => {
                println!(
                    "vdaq-app: timestamps say {} ns per frame, {rate} Hz is {expected:.0} ns",
                    other.map_or("nothing".into(), |ns| format!("{ns:.0}"))
                );
                pass = false;
            }
        }
    }
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdaq_wire::pattern::counter_sample;

    fn capture(path: &std::path::Path, frames: std::ops::Range<u64>) {
        // 2 of 3 S16 channels, then the timestamp at 8: 16 bytes per scan.
        let mut out = Vec::new();
        for frame in frames {
            for c in [0u64, 2] {
                out.extend_from_slice(&counter_sample(SampleFormat::S16, frame * 3 + c)[..2]);
            }
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&(frame as i64 * 20_000).to_le_bytes());
        }
        std::fs::write(path, out).expect("written");
    }

    fn args(file: &std::path::Path, extra: &[&str]) -> ScanArgs {
        let mut argv = vec!["verify-scans", file.to_str().expect("utf-8")];
        argv.extend_from_slice(&[
            "--format",
            "s16",
            "--card-channels",
            "3",
            "--enabled",
            "0,2",
            "--timestamp",
        ]);
        argv.extend_from_slice(extra);
        ScanArgs::try_parse_from(argv).expect("arguments")
    }

    #[test]
    fn captures_pass_or_fail_on_samples_gaps_and_rate() {
        let dir = std::env::temp_dir().join(format!("vdaq-scans-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("capture.bin");
        capture(&file, 100..5000);
        assert!(run(&args(&file, &["--rate-hz", "50000"])).expect("ran"));
        assert!(!run(&args(&file, &["--rate-hz", "10000"])).expect("ran"));
        assert!(!run(&args(&file, &["--min-scans", "10000"])).expect("ran"));
        let mut bytes = std::fs::read(&file).expect("read");
        bytes.drain(16 * 10..16 * 20); // ten frames dropped
        std::fs::write(&file, &bytes).expect("written");
        assert!(!run(&args(&file, &[])).expect("ran"));
        assert!(run(&args(&file, &["--allow-gaps", "--rate-hz", "50000"])).expect("ran"));
        bytes[16 * 30] ^= 4;
        std::fs::write(&file, &bytes).expect("written");
        assert!(!run(&args(&file, &["--allow-gaps"])).expect("ran"));
        assert!(run(&args(&file, &["--enabled", "3"])).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
