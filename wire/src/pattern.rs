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
///
/// One read pass, one load per eight bytes: the expected samples are not read from a table
/// (that doubles the loads, and a load is what an emulated guest pays most for) but computed
/// in registers, a 64-bit word of samples at a time (`words_differ`). Only a block that fails
/// is searched sample by sample.
pub fn verify_counter(format: SampleFormat, first_sample: u64, samples: &[u8]) -> Option<usize> {
    const BLOCK_SAMPLES: usize = 4096;
    let size = format.sample_bytes();
    let whole = samples.len() - samples.len() % size;
    for (block_index, block) in samples[..whole].chunks(BLOCK_SAMPLES * size).enumerate() {
        let first = first_sample.wrapping_add((block_index * BLOCK_SAMPLES) as u64);
        let mismatch = match format {
            // Four 16-bit lanes a word, each advancing by 4 modulo 2^16.
            SampleFormat::S16 => lanes_differ(block, first, SampleFormat::S16),
            // Two 32-bit lanes a word, each advancing by 2 modulo 2^32.
            SampleFormat::S32 => lanes_differ(block, first, SampleFormat::S32),
            SampleFormat::F32 => f32_differs(block, first),
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

/// The word of counter samples `first ..` (as many as fit in eight bytes).
fn counter_word(format: SampleFormat, first: u64) -> u64 {
    let size = format.sample_bytes();
    let mut word = [0u8; 8];
    for (i, sample) in word.chunks_exact_mut(size).enumerate() {
        sample.copy_from_slice(&counter_sample(format, first.wrapping_add(i as u64))[..size]);
    }
    u64::from_le_bytes(word)
}

/// The XOR of each eight-byte word of `bytes` (a multiple of eight long) with `first + k ×
/// step` for word k, OR-ed together: zero if every word is as expected. Four words a round
/// from `chunks_exact`, so the loop has one branch and no bounds checks: under an emulator
/// (TCG) every guest branch ends a translation block, and a load costs far more than an add.
#[inline(always)]
fn words_differ(bytes: &[u8], first: u64, step: u64) -> u64 {
    let load = |word: &[u8]| u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
    let (step2, step3, step4) = (step << 1, step.wrapping_mul(3), step << 2);
    let mut expected = first;
    let mut diff = 0u64;
    let mut rounds = bytes.chunks_exact(32);
    for round in &mut rounds {
        diff |= (load(&round[..8]) ^ expected)
            | (load(&round[8..16]) ^ expected.wrapping_add(step))
            | (load(&round[16..24]) ^ expected.wrapping_add(step2))
            | (load(&round[24..]) ^ expected.wrapping_add(step3));
        expected = expected.wrapping_add(step4);
    }
    for word in rounds.remainder().chunks_exact(8) {
        diff |= load(word) ^ expected;
        expected = expected.wrapping_add(step);
    }
    diff
}

/// Whether `block` (whole samples) differs from the S16 or S32 counter starting at `first`.
/// A word holds `lanes` consecutive samples, and the next word the same plus `lanes` in every
/// lane: one plain add, as long as no lane wraps around its width. So the block is checked in
/// stretches between wraps (every 2^16 samples for S16), each with [`words_differ`]; a word in
/// which the counter wraps is checked sample by sample.
fn lanes_differ(block: &[u8], first: u64, format: SampleFormat) -> bool {
    let size = format.sample_bytes();
    let lanes = (8 / size) as u64;
    let width_max = if size == 2 { 0xffff } else { 0xffff_ffff };
    // The same value in every lane: what one word adds.
    let step = if size == 2 {
        0x0004_0004_0004_0004
    } else {
        0x0000_0002_0000_0002
    };
    let words = block.len() / 8;
    let mut diff = 0u64;
    let mut word = 0usize;
    while word < words {
        let n = first.wrapping_add(word as u64 * lanes);
        let last_lane = (n & width_max) + lanes - 1;
        let stretch = if last_lane <= width_max {
            (((width_max - last_lane) / lanes + 1) as usize).min(words - word)
        } else {
            0
        };
        if stretch == 0 {
            diff |= u64::from(tail_differs(format, n, &block[8 * word..8 * word + 8]));
            word += 1;
            continue;
        }
        diff |= words_differ(
            &block[8 * word..8 * (word + stretch)],
            counter_word(format, n),
            step,
        );
        word += stretch;
    }
    let tail_first = first.wrapping_add(words as u64 * lanes);
    diff != 0 || tail_differs(format, tail_first, &block[8 * words..])
}

/// Whether the samples of `tail` differ from the counter at `first` (checked one by one).
fn tail_differs(format: SampleFormat, first: u64, tail: &[u8]) -> bool {
    let size = format.sample_bytes();
    tail.chunks_exact(size)
        .enumerate()
        .any(|(i, sample)| sample != &counter_sample(format, first.wrapping_add(i as u64))[..size])
}

/// Whether `block` differs from the F32 counter starting at `first`. Between two powers of
/// two the float of n grows by a constant step of its bit pattern (n = 2^k + m has bits
/// (127 + k) << 23 | m << (23 - k)), so each run of one exponent is checked two samples a
/// word with [`words_differ`] (no lane can carry: the bits stay under 2^31); a sample left
/// over at the end of a run is checked on its own.
fn f32_differs(block: &[u8], first: u64) -> bool {
    let samples = block.len() / 4;
    let mut diff = 0u64;
    let mut i = 0;
    while i < samples {
        let n = first.wrapping_add(i as u64) & 0xff_ffff;
        // The run of samples sharing n's exponent: up to the next power of two, or the wrap at
        // 2^24 (0 and 1 are runs of one).
        let (run_end, step) = if n < 2 {
            (n + 1, 0)
        } else {
            let exponent = 63 - n.leading_zeros();
            (1u64 << (exponent + 1), 1u64 << (23 - exponent))
        };
        let run = ((run_end - n) as usize).min(samples - i);
        let pairs = run / 2;
        if pairs > 0 {
            let bits = u64::from((n as u32 as f32).to_bits());
            diff |= words_differ(
                &block[4 * i..4 * (i + 2 * pairs)],
                bits | ((bits + step) << 32),
                (2 * step) | ((2 * step) << 32),
            );
        }
        if 2 * pairs < run {
            let last = i + run - 1;
            diff |= u64::from(tail_differs(
                SampleFormat::F32,
                first.wrapping_add(last as u64),
                &block[4 * last..4 * (last + 1)],
            ));
        }
        i += run;
    }
    diff != 0
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    /// Every single wrong bit is found, and in the right sample, at phases across every
    /// wrap and (F32) exponent change, for lengths that end mid-word and mid-round.
    #[test]
    fn every_single_bit_flip_is_found_in_its_sample() {
        let phases: [(SampleFormat, &[u64]); 3] = [
            (SampleFormat::S16, &[0, 3, 65_530, 65_533, 3 * 65_536 - 1]),
            (
                SampleFormat::S32,
                &[0, 1, (1 << 31) - 5, (1 << 32) - 7, (1 << 32) - 2],
            ),
            (
                SampleFormat::F32,
                &[
                    0,
                    1,
                    2,
                    3,
                    5,
                    62,
                    127,
                    (1 << 23) - 9,
                    (1 << 24) - 40,
                    (1 << 24) - 3,
                ],
            ),
        ];
        for (format, firsts) in phases {
            let size = format.sample_bytes();
            for &first in firsts {
                for samples in [1usize, 3, 4, 5, 7, 67] {
                    let mut buf = std::vec![0u8; samples * size];
                    fill_counter(format, first, &mut buf);
                    assert_eq!(
                        verify_counter(format, first, &buf),
                        None,
                        "{format:?} {first}"
                    );
                    for bit in 0..buf.len() * 8 {
                        buf[bit / 8] ^= 1 << (bit % 8);
                        assert_eq!(
                            verify_counter(format, first, &buf),
                            Some(bit / 8 / size),
                            "{format:?} first {first}, {samples} samples, bit {bit}"
                        );
                        buf[bit / 8] ^= 1 << (bit % 8);
                    }
                }
            }
        }
    }

    #[test]
    fn long_streams_verify_across_blocks_and_every_exponent() {
        for format in SampleFormat::ALL {
            let first = (1 << 24) - 70_000;
            let mut buf = std::vec![0u8; 140_000 * format.sample_bytes()];
            fill_counter(format, first, &mut buf);
            assert_eq!(verify_counter(format, first, &buf), None, "{format:?}");
            let last = buf.len() - 1;
            buf[last] ^= 0x80;
            assert_eq!(
                verify_counter(format, first, &buf),
                Some(139_999),
                "{format:?}"
            );
        }
        let mut from_zero = std::vec![0u8; 4 << 24];
        fill_counter(SampleFormat::F32, 0, &mut from_zero);
        assert_eq!(verify_counter(SampleFormat::F32, 0, &from_zero), None);
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
