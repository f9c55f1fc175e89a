//! Verification of the card's stream as Linux IIO delivers it: a sequence of *scans*, one per
//! frame, each holding the enabled channels' samples in channel order and, optionally, a
//! 64-bit timestamp — what `iio_readdev` writes and `/dev/iio:deviceN` reads. Unlike the card's
//! own read buffers, scans carry no frame numbers: the first scan fixes where the counter
//! stream stands, and every later sample must continue it. Frames the card dropped appear as
//! a jump of the counter, reported as a gap of whole frames (for the driver's dropped-frame
//! count to account for).

use crate::pattern::counter_sample;
use crate::SampleFormat;

/// How the scans are laid out, IIO's rules: each sample aligned to its own size, the
/// timestamp (s64) to 8 bytes, the scan padded to its largest element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanLayout {
    /// Sample encoding.
    pub format: SampleFormat,
    /// Channels per frame on the card (enabled or not): the counter's stride.
    pub card_channels: u16,
    /// Bit c set: channel c is in the scan. At most 64 channels.
    pub enabled: u64,
    /// A timestamp follows the samples.
    pub timestamp: bool,
}

impl ScanLayout {
    fn channels(&self) -> impl Iterator<Item = u16> + '_ {
        (0..self.card_channels.min(64)).filter(|c| self.enabled & (1 << c) != 0)
    }

    fn sample_bytes(&self) -> usize {
        self.format.sample_bytes()
    }

    /// Offset of the timestamp in a scan.
    fn timestamp_offset(&self) -> usize {
        (self.channels().count() * self.sample_bytes()).next_multiple_of(8)
    }

    /// Bytes per scan.
    pub fn scan_bytes(&self) -> usize {
        let samples = self.channels().count() * self.sample_bytes();
        if self.timestamp {
            self.timestamp_offset() + 8
        } else {
            samples
        }
    }
}

/// What is wrong with a scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanError {
    /// The layout has no enabled channel on the card, or the scan is not `scan_bytes` long.
    Layout,
    /// The first scan's samples fit no frame of the counter stream.
    NoFrame,
    /// A sample is not the counter value of the frame its scan continues (nor of any later
    /// frame, as a gap would be).
    Sample {
        /// Scan number (from 0).
        scan: u64,
        /// Card channel.
        channel: u16,
    },
    /// The timestamp did not increase.
    Timestamp {
        /// Scan number (from 0).
        scan: u64,
    },
}

/// Totals of the scans checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Scans checked and found valid.
    pub scans: u64,
    /// Samples in them.
    pub samples: u64,
    /// Scans that failed.
    pub errors: u64,
    /// Jumps of the counter: places where frames are missing.
    pub gaps: u64,
    /// Frames missing at those jumps.
    pub skipped_frames: u64,
    /// First and last timestamp, ns (0 without timestamps).
    pub first_timestamp_ns: i64,
    /// Last timestamp, ns.
    pub last_timestamp_ns: i64,
}

impl ScanStats {
    /// Mean time between consecutive frames (ns), from the timestamps and the frames between
    /// them; `None` without two timestamped scans.
    pub fn mean_frame_interval_ns(&self) -> Option<f64> {
        let frames = (self.scans + self.skipped_frames).checked_sub(1)?;
        (frames > 0 && self.last_timestamp_ns > self.first_timestamp_ns)
            .then(|| (self.last_timestamp_ns - self.first_timestamp_ns) as f64 / frames as f64)
    }
}

/// Checks scans one after the other; see the module documentation.
#[derive(Clone, Debug)]
pub struct ScanVerifier {
    layout: ScanLayout,
    /// Frame number the next scan should carry, once the first scan fixed it.
    next_frame: Option<u64>,
    last_timestamp: Option<i64>,
    stats: ScanStats,
}

impl ScanVerifier {
    /// A verifier for scans laid out as `layout`.
    pub fn new(layout: ScanLayout) -> Self {
        ScanVerifier {
            layout,
            next_frame: None,
            last_timestamp: None,
            stats: ScanStats::default(),
        }
    }

    /// Totals so far.
    pub fn stats(&self) -> ScanStats {
        self.stats
    }

    /// Counter values repeat after this many samples (2^16 for S16, 2^32 for S32, 2^24 for
    /// F32): a frame number is known modulo `period / card_channels` at best.
    fn period(&self) -> u64 {
        match self.layout.format {
            SampleFormat::S16 => 1 << 16,
            SampleFormat::S32 => 1 << 32,
            SampleFormat::F32 => 1 << 24,
        }
    }

    fn matches(&self, scan: &[u8], frame: u64) -> Option<u16> {
        let size = self.layout.sample_bytes();
        let stride = u64::from(self.layout.card_channels);
        self.layout
            .channels()
            .enumerate()
            .find(|&(i, c)| {
                let expected = counter_sample(
                    self.layout.format,
                    frame.wrapping_mul(stride) + u64::from(c),
                );
                scan[i * size..(i + 1) * size] != expected[..size]
            })
            .map(|(_, c)| c)
    }

    /// The frame numbers (modulo the counter's period) whose first enabled sample equals the
    /// scan's, lowest first from `from`: at most a handful for any layout.
    fn frame_of(&self, scan: &[u8], from: u64) -> Option<u64> {
        let size = self.layout.sample_bytes();
        let first = self.layout.channels().next()?;
        let mut raw = [0u8; 4];
        raw[..size].copy_from_slice(&scan[..size]);
        let value = match self.layout.format {
            SampleFormat::S16 => u64::from(u16::from_le_bytes([raw[0], raw[1]])),
            SampleFormat::S32 => u64::from(u32::from_le_bytes(raw)),
            // Integers below 2^24 are exact in f32; anything else is no counter value.
            SampleFormat::F32 => {
                let v = f32::from_le_bytes(raw);
                if !(0.0..16_777_216.0).contains(&v) || v != (v as u32) as f32 {
                    return None;
                }
                v as u64
            }
        };
        // Solve frame × stride ≡ value − first (mod period). With g = gcd(period, stride) it
        // has solutions only when g divides the right side; they repeat every period / g
        // frames.
        let period = self.period();
        let stride = u64::from(self.layout.card_channels);
        let target = (value + period - u64::from(first) % period) % period;
        let g = gcd(period, stride);
        if target % g != 0 {
            return None;
        }
        let repeat = period / g;
        let inverse = mod_inverse((stride / g) % repeat, repeat)?;
        let k = (target / g) % repeat * inverse % repeat;
        // The smallest solution ≥ `from`.
        let base = from - from % repeat + k;
        Some(if base < from { base + repeat } else { base })
    }

    /// Checks one scan of exactly [`ScanLayout::scan_bytes`] bytes.
    pub fn check(&mut self, scan: &[u8]) -> Result<(), ScanError> {
        let result = self.check_inner(scan);
        if result.is_err() {
            self.stats.errors += 1;
        }
        result
    }

    fn check_inner(&mut self, scan: &[u8]) -> Result<(), ScanError> {
        if scan.len() != self.layout.scan_bytes() || self.layout.channels().next().is_none() {
            return Err(ScanError::Layout);
        }
        let index = self.stats.scans + self.stats.errors;
        let frame = match self.next_frame {
            None => self.frame_of(scan, 0).ok_or(ScanError::NoFrame)?,
            Some(expected) => match self.matches(scan, expected) {
                None => expected,
                Some(channel) => {
                    // Not the next frame: a later one (frames dropped), or an error.
                    let later = self.frame_of(scan, expected + 1).ok_or(ScanError::Sample {
                        scan: index,
                        channel,
                    })?;
                    if self.matches(scan, later).is_some() {
                        return Err(ScanError::Sample {
                            scan: index,
                            channel,
                        });
                    }
                    self.stats.gaps += 1;
                    self.stats.skipped_frames += later - expected;
                    later
                }
            },
        };
        if let Some(channel) = self.matches(scan, frame) {
            return Err(ScanError::Sample {
                scan: index,
                channel,
            });
        }
        if self.layout.timestamp {
            let at = self.layout.timestamp_offset();
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&scan[at..at + 8]);
            let timestamp = i64::from_le_bytes(bytes);
            if self.last_timestamp.is_some_and(|last| timestamp <= last) {
                return Err(ScanError::Timestamp { scan: index });
            }
            if self.last_timestamp.is_none() {
                self.stats.first_timestamp_ns = timestamp;
            }
            self.last_timestamp = Some(timestamp);
            self.stats.last_timestamp_ns = timestamp;
        }
        self.next_frame = Some(frame + 1);
        self.stats.scans += 1;
        self.stats.samples += self.layout.channels().count() as u64;
        Ok(())
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// x with a·x ≡ 1 (mod m), for a coprime to m (extended Euclid in i128: m ≤ 2^32).
fn mod_inverse(a: u64, m: u64) -> Option<u64> {
    if m == 1 {
        return Some(0);
    }
    let (mut old_r, mut r) = (i128::from(a), i128::from(m));
    let (mut old_s, mut s) = (1i128, 0i128);
    while r != 0 {
        let q = old_r / r;
        (old_r, r) = (r, old_r - q * r);
        (old_s, s) = (s, old_s - q * s);
    }
    (old_r == 1).then(|| old_s.rem_euclid(i128::from(m)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S16_ALL4: ScanLayout = ScanLayout {
        format: SampleFormat::S16,
        card_channels: 4,
        enabled: 0b1111,
        timestamp: true,
    };

    /// The scan of `frame` in `layout`, timestamped `frame × 1000` ns.
    fn scan(layout: ScanLayout, frame: u64) -> [u8; 64] {
        let mut out = [0u8; 64];
        let size = layout.format.sample_bytes();
        for (i, c) in layout.channels().enumerate() {
            let n = frame * u64::from(layout.card_channels) + u64::from(c);
            out[i * size..(i + 1) * size]
                .copy_from_slice(&counter_sample(layout.format, n)[..size]);
        }
        if layout.timestamp {
            let at = layout.timestamp_offset();
            out[at..at + 8].copy_from_slice(&(frame as i64 * 1000).to_le_bytes());
        }
        out
    }

    #[test]
    fn layouts_follow_iio_alignment() {
        assert_eq!(S16_ALL4.scan_bytes(), 16);
        let three = ScanLayout {
            enabled: 0b0111,
            ..S16_ALL4
        };
        assert_eq!((three.timestamp_offset(), three.scan_bytes()), (8, 16));
        let s32 = ScanLayout {
            format: SampleFormat::S32,
            card_channels: 3,
            enabled: 0b101,
            timestamp: false,
        };
        assert_eq!(s32.scan_bytes(), 8);
    }

    #[test]
    fn a_stream_starting_anywhere_verifies_and_times() {
        for (layout, start) in [
            (S16_ALL4, 12_345),
            (
                ScanLayout {
                    card_channels: 3,
                    enabled: 0b110,
                    ..S16_ALL4
                },
                40_000,
            ),
            (
                ScanLayout {
                    format: SampleFormat::S32,
                    ..S16_ALL4
                },
                7,
            ),
            (
                ScanLayout {
                    format: SampleFormat::F32,
                    card_channels: 5,
                    ..S16_ALL4
                },
                999,
            ),
        ] {
            let mut verifier = ScanVerifier::new(layout);
            let len = layout.scan_bytes();
            for frame in start..start + 70_000 {
                verifier
                    .check(&scan(layout, frame)[..len])
                    .unwrap_or_else(|e| panic!("{layout:?} frame {frame}: {e:?}"));
            }
            let stats = verifier.stats();
            assert_eq!((stats.scans, stats.errors, stats.gaps), (70_000, 0, 0));
            assert_eq!(stats.mean_frame_interval_ns(), Some(1000.0));
        }
    }

    #[test]
    fn dropped_frames_are_a_gap_and_a_wrong_sample_an_error() {
        let mut verifier = ScanVerifier::new(S16_ALL4);
        for frame in [10, 11, 12, 500, 501] {
            verifier.check(&scan(S16_ALL4, frame)[..16]).expect("valid");
        }
        assert_eq!(
            (verifier.stats().gaps, verifier.stats().skipped_frames),
            (1, 487)
        );
        assert_eq!(verifier.stats().mean_frame_interval_ns(), Some(1000.0));
        let mut bad = scan(S16_ALL4, 502);
        bad[2] ^= 1; // channel 1
        assert_eq!(
            verifier.check(&bad[..16]),
            Err(ScanError::Sample {
                scan: 5,
                channel: 1
            })
        );
        // Out of order in time.
        let mut late = scan(S16_ALL4, 502);
        late[8..16].copy_from_slice(&0i64.to_le_bytes());
        assert_eq!(
            verifier.check(&late[..16]),
            Err(ScanError::Timestamp { scan: 6 })
        );
        assert_eq!(
            verifier.check(&scan(S16_ALL4, 502)[..15]),
            Err(ScanError::Layout)
        );
        assert_eq!(verifier.stats().errors, 3);
    }

    #[test]
    fn a_first_scan_off_the_counter_is_refused() {
        let mut verifier = ScanVerifier::new(S16_ALL4);
        let mut first = scan(S16_ALL4, 3);
        first[0] ^= 1; // sample 12 → 13: not channel 0 of any frame
        assert_eq!(verifier.check(&first[..16]), Err(ScanError::NoFrame));
        let mut f32 = ScanVerifier::new(ScanLayout {
            format: SampleFormat::F32,
            ..S16_ALL4
        });
        let mut half = [0u8; 24];
        half[..4].copy_from_slice(&0.5f32.to_le_bytes());
        assert_eq!(f32.check(&half), Err(ScanError::NoFrame));
    }
}
