//! The latency histogram the guests print after a run: one line, [`LATENCY_PREFIX`] then
//! `low:count` pairs for each non-empty bucket, read by the launcher (`vdaq --plot`).
//!
//! Buckets are log-linear, four per octave (the shape HDR histograms use, at a resolution a
//! chart needs): 0–7 µs one bucket per microsecond, then each power of two split in four,
//! so every bucket is at most 25 % wide and any `u32` of microseconds has a bucket.

use core::fmt;

/// Prefix of the histogram line.
pub const LATENCY_PREFIX: &str = "VDAQ-LATENCY ";

/// Buckets needed for every `u32` latency in microseconds.
pub const BUCKETS: usize = 124;

/// The bucket of a latency of `us` microseconds.
pub fn bucket_of(us: u64) -> usize {
    if us < 8 {
        return us as usize;
    }
    let octave = 63 - us.leading_zeros() as usize; // ≥ 3
    let quarter = ((us >> (octave - 2)) & 3) as usize;
    8 + (octave - 3) * 4 + quarter
}

/// The lower edge (µs, inclusive) of bucket `index`; the upper edge is that of `index + 1`.
pub fn bucket_low_us(index: usize) -> u64 {
    if index < 8 {
        return index as u64;
    }
    let octave = (index - 8) / 4 + 3;
    let quarter = ((index - 8) % 4) as u64;
    (4 + quarter) << (octave - 2)
}

/// Writes the histogram of `sorted_us` (latencies in µs) as the line: `low:count` for each
/// non-empty bucket, separated by spaces (the [`Histogram`] of those latencies).
#[derive(Clone, Copy, Debug)]
pub struct HistogramLine<'a>(pub &'a [u32]);

impl fmt::Display for HistogramLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut histogram = Histogram::default();
        for &us in self.0 {
            histogram.record(us);
        }
        histogram.fmt(f)
    }
}

/// Latencies counted per bucket: constant memory however long a run lasts (a guest that kept
/// every latency ran out of heap after ~7 M completions of a free-running soak). It prints as
/// the same line as [`HistogramLine`] over the same latencies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    counts: [u64; BUCKETS],
    total: u64,
    max_us: u32,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: [0; BUCKETS],
            total: 0,
            max_us: 0,
        }
    }
}

impl Histogram {
    /// Counts one latency.
    pub fn record(&mut self, us: u32) {
        let bucket = bucket_of(u64::from(us)).min(BUCKETS - 1);
        self.counts[bucket] = self.counts[bucket].saturating_add(1);
        self.total = self.total.saturating_add(1);
        self.max_us = self.max_us.max(us);
    }

    /// Latencies counted.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The largest latency counted (exact).
    pub fn max_us(&self) -> u32 {
        self.max_us
    }

    /// The latency at `per_mille` ‰ (as [`crate::report::percentile`] picks it from sorted
    /// latencies) to the histogram's resolution: the lower edge of its bucket, at most
    /// [`Histogram::max_us`]. 0 when empty.
    pub fn percentile_us(&self, per_mille: u64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let index = (self.total.saturating_mul(per_mille) / 1000).min(self.total - 1);
        let mut below = 0u64;
        for (bucket, &count) in self.counts.iter().enumerate() {
            below += count;
            if below > index {
                return bucket_low_us(bucket).min(u64::from(self.max_us));
            }
        }
        u64::from(self.max_us)
    }
}

impl fmt::Display for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(LATENCY_PREFIX.trim_end())?;
        for (bucket, &count) in self.counts.iter().enumerate() {
            if count > 0 {
                write!(f, " {}:{}", bucket_low_us(bucket), count)?;
            }
        }
        Ok(())
    }
}

/// Latencies for a report: every one up to [`KEPT_LATENCIES`] (exact percentiles), and all of
/// them in a [`Histogram`] (its percentiles once there were more).
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Default)]
pub struct LatencyRecord {
    kept: alloc::vec::Vec<u32>,
    histogram: Histogram,
}

/// Latencies a [`LatencyRecord`] keeps one by one (4 MiB).
pub const KEPT_LATENCIES: usize = 1 << 20;

#[cfg(feature = "alloc")]
impl LatencyRecord {
    /// Counts one latency.
    pub fn record(&mut self, us: u32) {
        if self.kept.len() < KEPT_LATENCIES {
            self.kept.push(us);
        }
        self.histogram.record(us);
    }

    /// Percentiles and maximum into `report`; exact while every latency was kept.
    pub fn finish(mut self, report: &mut crate::report::Report<'_>) -> Histogram {
        if self.histogram.total() as usize <= self.kept.len() {
            self.kept.sort_unstable();
            report.latency_p50_us = crate::report::percentile(&self.kept, 500);
            report.latency_p99_us = crate::report::percentile(&self.kept, 990);
        } else {
            report.latency_p50_us = self.histogram.percentile_us(500);
            report.latency_p99_us = self.histogram.percentile_us(990);
        }
        report.latency_max_us = u64::from(self.histogram.max_us());
        self.histogram
    }
}

/// One bucket as read back: `[low_us, high_us)` held `count` latencies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketCount {
    /// Lower edge (µs, inclusive).
    pub low_us: u64,
    /// Upper edge (µs, exclusive).
    pub high_us: u64,
    /// Latencies in the bucket.
    pub count: u64,
}

/// Parses a line's body (after [`LATENCY_PREFIX`]); `None` for a malformed pair or a lower
/// edge that is not a bucket's.
pub fn parse_buckets(body: &str) -> impl Iterator<Item = Option<BucketCount>> + '_ {
    body.split_ascii_whitespace().map(|pair| {
        let (low, count) = pair.split_once(':')?;
        let low_us: u64 = low.parse().ok()?;
        let bucket = bucket_of(low_us);
        if bucket >= BUCKETS || bucket_low_us(bucket) != low_us {
            return None;
        }
        Some(BucketCount {
            low_us,
            high_us: bucket_low_us(bucket + 1),
            count: count.parse().ok()?,
        })
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString;
    use std::vec::Vec;

    use super::*;

    #[test]
    fn every_latency_falls_between_its_buckets_edges_and_buckets_are_at_most_a_quarter_wide() {
        let mut probes: Vec<u64> = (0..5000).collect();
        probes.extend((0..32).flat_map(|s| [1u64 << s, (1u64 << s) - 1, (1u64 << s) + 1]));
        probes.push(u64::from(u32::MAX));
        for us in probes {
            let bucket = bucket_of(us);
            assert!(bucket < BUCKETS, "{us} µs");
            let (low, high) = (bucket_low_us(bucket), bucket_low_us(bucket + 1));
            assert!(low <= us && us < high, "{us} µs in [{low}, {high})");
            assert!(
                high - low <= (low / 4).max(1),
                "bucket [{low}, {high}) too wide"
            );
        }
        assert_eq!(bucket_of(u64::from(u32::MAX)), BUCKETS - 1);
    }

    #[test]
    fn the_line_round_trips_through_the_parser() {
        let sorted = [0u32, 0, 3, 8, 9, 10, 11, 100, 120, 127, 128, 70_000];
        let line = HistogramLine(&sorted).to_string();
        assert_eq!(
            line,
            "VDAQ-LATENCY 0:2 3:1 8:2 10:2 96:1 112:2 128:1 65536:1"
        );
        let body = line.strip_prefix(LATENCY_PREFIX).expect("prefix");
        let buckets: Vec<BucketCount> = parse_buckets(body).map(|b| b.expect("valid")).collect();
        assert_eq!(
            buckets.iter().map(|b| b.count).sum::<u64>(),
            sorted.len() as u64
        );
        assert_eq!(
            buckets[5],
            BucketCount {
                low_us: 112,
                high_us: 128,
                count: 2
            }
        );
        assert_eq!(HistogramLine(&[]).to_string(), "VDAQ-LATENCY");
    }

    #[test]
    fn malformed_pairs_and_edges_that_are_no_buckets_are_refused() {
        let parsed: Vec<Option<BucketCount>> = parse_buckets("8:1 9:x 9 11:2 -1:3").collect();
        assert!(parsed[0].is_some());
        assert!(parsed[1].is_none());
        assert!(parsed[2].is_none());
        assert!(parsed[3].is_none(), "11 is inside bucket [10, 12)");
        assert!(parsed[4].is_none());
    }

    #[test]
    fn a_histogram_prints_the_same_line_as_the_sorted_latencies_and_bounds_percentiles() {
        let mut latencies: [u32; 9] = [0, 3, 9, 10, 100, 130, 5000, 5001, u32::MAX];
        latencies.sort_unstable();
        let mut histogram = Histogram::default();
        for &us in latencies.iter().rev() {
            histogram.record(us);
        }
        assert_eq!(
            histogram.to_string(),
            HistogramLine(&latencies).to_string(),
            "the same line, in constant memory"
        );
        assert_eq!(histogram.total(), 9);
        assert_eq!(histogram.max_us(), u32::MAX);
        for per_mille in [0, 500, 990, 1000] {
            let exact = crate::report::percentile(&latencies, per_mille as usize);
            let approx = histogram.percentile_us(per_mille);
            assert!(
                approx <= exact && exact <= bucket_low_us(bucket_of(approx) + 1),
                "‰{per_mille}: {approx} is the lower edge of {exact}'s bucket"
            );
        }
        assert_eq!(Histogram::default().percentile_us(500), 0);
    }
}
