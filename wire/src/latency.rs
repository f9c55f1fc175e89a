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

/// Writes the histogram of `sorted_us` (latencies in µs, ascending) as the line's body:
/// `low:count` for each non-empty bucket, separated by spaces.
#[derive(Clone, Copy, Debug)]
pub struct HistogramLine<'a>(pub &'a [u32]);

impl fmt::Display for HistogramLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(LATENCY_PREFIX.trim_end())?;
        let mut rest = self.0;
        while let Some(&first) = rest.first() {
            let bucket = bucket_of(u64::from(first));
            let high = bucket_low_us(bucket + 1);
            // Sorted: the bucket's members are the prefix below its upper edge.
            let count = rest.partition_point(|&us| u64::from(us) < high);
            write!(f, " {}:{}", bucket_low_us(bucket), count)?;
            rest = &rest[count..];
        }
        Ok(())
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
}
