//! What a process holds, read from /proc: resident memory, open file descriptors, threads.
//! Sampled through a long run (`vdaq --sample-resources`), it shows whether the backend or
//! QEMU grows.

use std::path::Path;
use std::time::Duration;

/// One process at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Resident set (KiB).
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Threads.
    pub threads: u64,
}

/// Backend and QEMU at one moment of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Since QEMU started.
    pub at_ms: u64,
    /// The backend.
    pub backend: Usage,
    /// QEMU.
    pub qemu: Usage,
}

/// `pid`'s usage, or None if it is gone (or /proc cannot be read).
pub fn usage(pid: u32) -> Option<Usage> {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let status = std::fs::read_to_string(proc_dir.join("status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|line| {
            line.strip_prefix(name)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
    };
    let fds = std::fs::read_dir(proc_dir.join("fd")).ok()?.count() as u64;
    Some(Usage {
        rss_kib: field("VmRSS:")?,
        fds,
        threads: field("Threads:")?,
    })
}

/// First, lowest, highest and last value of one quantity over the samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// At the first sample.
    pub first: u64,
    /// Lowest.
    pub min: u64,
    /// Highest.
    pub max: u64,
    /// At the last sample.
    pub last: u64,
}

/// The range of `quantity` over `samples` (None without samples).
pub fn range(samples: &[Sample], quantity: impl Fn(&Sample) -> u64) -> Option<Range> {
    let first = quantity(samples.first()?);
    let mut range = Range {
        first,
        min: first,
        max: first,
        last: first,
    };
    for sample in samples {
        let value = quantity(sample);
        range.min = range.min.min(value);
        range.max = range.max.max(value);
        range.last = value;
    }
    Some(range)
}

/// How often a run samples, when asked to.
pub fn interval(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds.clamp(0.1, 3600.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_descriptors_and_threads() {
        let me = usage(std::process::id()).expect("our own /proc entry");
        assert!(me.rss_kib > 0);
        assert!(me.fds >= 3, "stdin, stdout, stderr at least: {}", me.fds);
        // Other tests of this binary open and close descriptors meanwhile: only what this test
        // holds is certain.
        let extra: Vec<std::fs::File> = (0..50)
            .map(|_| std::fs::File::open("/proc/self/status").expect("open"))
            .collect();
        let during = usage(std::process::id()).expect("again").fds;
        assert!(during >= 50 + 3, "50 files held: {during}");
        drop(extra);
        assert!(me.threads >= 1);
        assert_eq!(usage(u32::MAX), None, "no such process");
    }

    #[test]
    fn a_range_keeps_first_min_max_and_last() {
        let sample = |rss| Sample {
            at_ms: 0,
            backend: Usage {
                rss_kib: rss,
                fds: 0,
                threads: 0,
            },
            qemu: Usage::default(),
        };
        let samples = [sample(5), sample(3), sample(9), sample(4)];
        assert_eq!(
            range(&samples, |s| s.backend.rss_kib),
            Some(Range {
                first: 5,
                min: 3,
                max: 9,
                last: 4
            })
        );
        assert_eq!(range(&[], |s| s.backend.rss_kib), None);
    }
}
