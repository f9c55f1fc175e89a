//! Signal sources: each sample is a pure function of (settings, frame index, channel), so the
//! FIFO only has to remember which frames it holds, and a replay of the same frames yields the
//! same bytes.

use vdaq_wire::pattern::fill_counter;
use vdaq_wire::{SampleFormat, SignalKind};

/// Nominal frame rate used for the phase of periodic signals in free-running mode, where the
/// device has no sample clock.
const FREE_RUNNING_NOMINAL_RATE_HZ: f64 = 1_000_000.0;

/// Everything that decides the value of a sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SignalParams {
    /// Waveform.
    pub kind: SignalKind,
    /// Encoding of each sample.
    pub format: SampleFormat,
    /// Channels per frame.
    pub channels: u16,
    /// Frame rate the phase advances at (Hz); 0 in free-running mode.
    pub rate_hz: u32,
    /// Frequency of periodic signals (mHz).
    pub freq_mhz: u32,
    /// Amplitude in ‰ of full scale.
    pub amplitude_permille: u16,
    /// Noise seed.
    pub seed: u64,
}

impl SignalParams {
    /// Bytes per frame.
    pub fn frame_bytes(&self) -> usize {
        self.format.sample_bytes() * self.channels as usize
    }

    /// Writes frames `first_frame..first_frame + out.len() / frame_bytes` into `out`.
    pub fn render(&self, first_frame: u64, out: &mut [u8]) {
        let channels = u64::from(self.channels);
        let first_sample = first_frame.wrapping_mul(channels);
        match self.kind {
            SignalKind::Counter => fill_counter(self.format, first_sample, out),
            _ => {
                let size = self.format.sample_bytes();
                for (i, sample) in out.chunks_exact_mut(size).enumerate() {
                    let n = first_sample.wrapping_add(i as u64);
                    let value = self.analog_value(n / channels, n % channels) * self.amplitude();
                    encode_analog(self.format, value, sample);
                }
            }
        }
    }

    fn amplitude(&self) -> f64 {
        f64::from(self.amplitude_permille.min(1000)) / 1000.0
    }

    /// Value in [-1, 1] of channel `channel` at frame `frame`.
    fn analog_value(&self, frame: u64, channel: u64) -> f64 {
        let rate = if self.rate_hz == 0 {
            FREE_RUNNING_NOMINAL_RATE_HZ
        } else {
            f64::from(self.rate_hz)
        };
        let cycles = frame as f64 * (f64::from(self.freq_mhz) / 1000.0) / rate
            + channel as f64 / f64::from(self.channels.max(1));
        let phase = cycles.fract();
        match self.kind {
            SignalKind::Sine => (phase * std::f64::consts::TAU).sin(),
            SignalKind::Square => {
                if phase < 0.5 {
                    1.0
                } else {
                    -1.0
                }
            }
            SignalKind::Sawtooth => 2.0 * phase - 1.0,
            SignalKind::Noise => {
                let n = frame
                    .wrapping_mul(u64::from(self.channels))
                    .wrapping_add(channel);
                let bits = splitmix64(self.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                // 53 random bits → [0, 1) → [-1, 1).
                (bits >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            }
            // Rendered by the card from its file source (`model::source`).
            SignalKind::Counter | SignalKind::File => 0.0,
        }
    }
}

/// Counter-based generator: noise sample n depends only on (seed, n), never on history, so
/// noise is reproducible from any frame on.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Encodes a full-scale value in [-1, 1] as one sample.
pub fn encode_analog(format: SampleFormat, value: f64, out: &mut [u8]) {
    let value = value.clamp(-1.0, 1.0);
    match format {
        SampleFormat::S16 => {
            // Scaling by a power of two keeps decode/encode exact for every integer sample
            // (file replay reproduces recordings bit for bit).
            let scaled = (value * 32_768.0).round().clamp(-32_768.0, 32_767.0);
            out.copy_from_slice(&(scaled as i16).to_le_bytes())
        }
        SampleFormat::S32 => {
            let scaled = (value * 2_147_483_648.0)
                .round()
                .clamp(-2_147_483_648.0, 2_147_483_647.0);
            out.copy_from_slice(&(scaled as i32).to_le_bytes())
        }
        SampleFormat::F32 => out.copy_from_slice(&(value as f32).to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdaq_wire::pattern::verify_counter;

    fn params(kind: SignalKind, format: SampleFormat) -> SignalParams {
        SignalParams {
            kind,
            format,
            channels: 2,
            rate_hz: 1000,
            freq_mhz: 10_000,
            amplitude_permille: 1000,
            seed: 7,
        }
    }

    fn f32_samples(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    #[test]
    fn counter_renders_the_wire_pattern() {
        let p = params(SignalKind::Counter, SampleFormat::S32);
        let mut out = vec![0u8; 8 * 100];
        p.render(500, &mut out);
        assert_eq!(verify_counter(SampleFormat::S32, 1000, &out), None);
    }

    #[test]
    fn sine_has_the_configured_period_and_channel_phase() {
        // 10 Hz at 1 kHz: period 100 frames; channel 1 is half a period behind channel 0.
        let p = params(SignalKind::Sine, SampleFormat::F32);
        let mut out = vec![0u8; 8 * 200];
        p.render(0, &mut out);
        let s = f32_samples(&out);
        assert!(s[0].abs() < 1e-6);
        assert!((s[2 * 25] - 1.0).abs() < 1e-6, "quarter period peaks");
        assert!((s[2 * 125] - 1.0).abs() < 1e-4, "periodic");
        assert!(s[1].abs() < 1e-6, "channel 1 starts half a period later");
        assert!((s[2 * 25 + 1] + 1.0).abs() < 1e-6, "channel 1 in antiphase");
    }

    #[test]
    fn square_and_sawtooth_shapes() {
        let mut out = vec![0u8; 8 * 100];
        params(SignalKind::Square, SampleFormat::F32).render(0, &mut out);
        let s = f32_samples(&out);
        assert_eq!(s[0], 1.0);
        assert_eq!(s[2 * 60], -1.0);
        params(SignalKind::Sawtooth, SampleFormat::F32).render(0, &mut out);
        let s = f32_samples(&out);
        assert_eq!(s[0], -1.0);
        assert!(s[2 * 50].abs() < 1e-6);
    }

    #[test]
    fn noise_is_reproducible_per_seed_and_position() {
        let p = params(SignalKind::Noise, SampleFormat::S16);
        let mut whole = vec![0u8; 4 * 64];
        p.render(100, &mut whole);
        let mut tail = vec![0u8; 4 * 32];
        p.render(132, &mut tail);
        assert_eq!(&whole[4 * 32..], &tail[..], "same frames, same values");
        let mut other = vec![0u8; 4 * 64];
        SignalParams { seed: 8, ..p }.render(100, &mut other);
        assert_ne!(whole, other, "another seed, another stream");
        assert!(whole.chunks_exact(2).any(|b| b != [0, 0]));
    }

    #[test]
    fn amplitude_scales_integer_formats() {
        let p = SignalParams {
            amplitude_permille: 500,
            ..params(SignalKind::Square, SampleFormat::S16)
        };
        let mut out = vec![0u8; 4];
        p.render(0, &mut out);
        assert_eq!(i16::from_le_bytes([out[0], out[1]]), 16_384);
    }
}
