//! The counter test pattern: the one signal a driver can verify sample by sample.
//!
//! Sample number n = frame × channels + channel (frame = stream index, counting dropped frames)
//! carries n truncated to the sample width: S16 → `n mod 2^16` as i16 bits, S32 →
//! `n mod 2^32` as i32 bits, F32 → `(n mod 2^24) as f32` (every such integer is exact in f32).

use crate::SampleFormat;

/// Counter value of sample `n` in `format`, as its little-endian bytes in the low bytes of
/// the returned array (2 or 4 of them are meaningful, per [`SampleFormat::sample_bytes`]).
#[inline]
pub fn counter_sample(format: SampleFormat, n: u64) -> [u8; 4] {
    match format {
        SampleFormat::S16 => {
            let [a, b] = (n as u16).to_le_bytes();
            [a, b, 0, 0]
        }
        SampleFormat::S32 => (n as u32).to_le_bytes(),
        SampleFormat::F32 => (((n & 0xff_ffff) as u32) as f32).to_le_bytes(),
    }
}

/// Samples in one period of the S16 counter.
pub const S16_PERIOD: usize = 1 << 16;

/// Two periods of the S16 counter as little-endian bytes: any window of up to one period, at
/// any phase, is one contiguous slice. Filling and checking S16 counter data then is a plain
/// memory copy or compare against this table.
static S16_TABLE: [u8; 4 * S16_PERIOD] = s16_table();

const fn s16_table() -> [u8; 4 * S16_PERIOD] {
    let mut table = [0u8; 4 * S16_PERIOD];
    let mut i = 0;
    while i < 2 * S16_PERIOD {
        let bytes = (i as u16).to_le_bytes();
        table[2 * i] = bytes[0];
        table[2 * i + 1] = bytes[1];
        i += 1;
    }
    table
}

/// The S16 counter bytes for samples `first_sample .. first_sample + samples`, borrowed from a
/// static table. `samples` must be at most [`S16_PERIOD`].
pub fn s16_counter_window(first_sample: u64, samples: usize) -> &'static [u8] {
    let start = (first_sample % S16_PERIOD as u64) as usize;
    let samples = samples.min(S16_PERIOD);
    &S16_TABLE[2 * start..2 * (start + samples)]
}

/// Whether two equally long slices differ, compared eight bytes at a time without an early
/// exit. Not `!=` on the slices: that is a `memcmp` call, and musl's (the Linux guest's libc)
/// walks byte by byte, which made the Linux application's verification ten times slower than
/// the bare-metal guest's under TCG.
fn differs(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return true;
    }
    // A plain index loop, no iterator adaptors: a zip of mapped chunks was once compiled to an
    // out-of-line call per word (codegen-unit placement), 25 times slower under TCG.
    let mut word_diff = 0u64;
    let mut at = 0;
    while at + 8 <= a.len() {
        let x = u64::from_ne_bytes(a[at..at + 8].try_into().unwrap_or([0; 8]));
        let y = u64::from_ne_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
        word_diff |= x ^ y;
        at += 8;
    }
    word_diff != 0 || a[at..] != b[at..]
}

/// Fills `out` with the counter pattern starting at sample number `first_sample`.
/// `out.len()` must be a multiple of the sample size; a trailing partial sample is left alone.
pub fn fill_counter(format: SampleFormat, first_sample: u64, out: &mut [u8]) {
    match format {
        SampleFormat::S16 => {
            let whole = out.len() / 2;
            for (block, chunk) in out[..2 * whole].chunks_mut(2 * S16_PERIOD).enumerate() {
                let first = first_sample.wrapping_add((block * S16_PERIOD) as u64);
                chunk.copy_from_slice(s16_counter_window(first, chunk.len() / 2));
            }
        }
        SampleFormat::S32 => {
            for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&(first_sample.wrapping_add(i as u64) as u32).to_le_bytes());
            }
        }
        SampleFormat::F32 => {
            for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
                let n = first_sample.wrapping_add(i as u64) & 0xff_ffff;
                chunk.copy_from_slice(&(n as u32 as f32).to_le_bytes());
            }
        }
    }
}

/// Checks that `samples` hold the counter pattern starting at sample number `first_sample`.
/// Returns the index of the first mismatching sample, if any.
pub fn verify_counter(format: SampleFormat, first_sample: u64, samples: &[u8]) -> Option<usize> {
    // One read pass: blocks are checked by OR-ing (sample XOR expected), a branch-free loop the
    // compiler vectorizes; only a block that fails is searched sample by sample.
    const BLOCK_SAMPLES: usize = 4096;
    let size = format.sample_bytes();
    let whole = samples.len() - samples.len() % size;
    for (block_index, block) in samples[..whole].chunks(BLOCK_SAMPLES * size).enumerate() {
        let first = first_sample.wrapping_add((block_index * BLOCK_SAMPLES) as u64);
        let mismatch = match format {
            SampleFormat::S16 => differs(block, s16_counter_window(first, block.len() / 2)),
            SampleFormat::S32 => {
                let base = first as u32;
                block.chunks_exact(4).enumerate().fold(0u32, |acc, (i, b)| {
                    acc | (u32::from_le_bytes([b[0], b[1], b[2], b[3]])
                        ^ base.wrapping_add(i as u32))
                }) != 0
            }
            SampleFormat::F32 => {
                block.chunks_exact(4).enumerate().fold(0u32, |acc, (i, b)| {
                    let n = first.wrapping_add(i as u64) & 0xff_ffff;
                    acc | (u32::from_le_bytes([b[0], b[1], b[2], b[3]])
                        ^ (n as u32 as f32).to_bits())
                }) != 0
            }
        };
        if mismatch {
            let bad = block
                .chunks_exact(size)
                .enumerate()
                .position(|(i, sample)| {
                    let expected = counter_sample(format, first.wrapping_add(i as u64));
                    sample != &expected[..size]
                })
                .unwrap_or(0);
            return Some(block_index * BLOCK_SAMPLES + bad);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differs_sees_every_byte_and_the_length() {
        let a: [u8; 21] = core::array::from_fn(|i| i as u8);
        assert!(!differs(&a, &a));
        for i in 0..a.len() {
            let mut b = a;
            b[i] ^= 0x40;
            assert!(differs(&a, &b), "byte {i}");
        }
        assert!(differs(&a, &a[..20]));
    }

    #[test]
    fn counter_wraps_at_the_sample_width() {
        assert_eq!(counter_sample(SampleFormat::S16, 0x1_0005), [5, 0, 0, 0]);
        assert_eq!(
            counter_sample(SampleFormat::S32, 0x1_0000_0007),
            [7, 0, 0, 0]
        );
        assert_eq!(
            counter_sample(SampleFormat::F32, (1 << 24) + 3),
            3.0f32.to_le_bytes()
        );
    }

    #[test]
    fn s16_windows_wrap_around_the_period() {
        let window = s16_counter_window(65_534, 4);
        assert_eq!(window, &[0xfe, 0xff, 0xff, 0xff, 0, 0, 1, 0]);
        assert_eq!(s16_counter_window(3 * 65_536 + 7, 1), &[7, 0]);
        let mut big = [0u8; 2 * 70_000];
        fill_counter(SampleFormat::S16, 123, &mut big);
        assert_eq!(verify_counter(SampleFormat::S16, 123, &big), None);
        assert_eq!(&big[2 * 69_999..], &((123 + 69_999) as u16).to_le_bytes());
    }

    #[test]
    fn fill_and_verify_agree_and_find_the_bad_sample() {
        for format in SampleFormat::ALL {
            let mut buf = [0u8; 10_000];
            fill_counter(format, 65_530, &mut buf);
            assert_eq!(verify_counter(format, 65_530, &buf), None);
            assert_eq!(
                &buf[..format.sample_bytes()],
                &counter_sample(format, 65_530)[..format.sample_bytes()]
            );
            let size = format.sample_bytes();
            buf[1234 * size] ^= 1;
            assert_eq!(verify_counter(format, 65_530, &buf), Some(1234));
            assert!(verify_counter(format, 65_531, &buf).is_some());
        }
    }
}
