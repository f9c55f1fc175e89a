//! What CONFIGURE sets ([`Settings`], with [`Settings::default`] as the one definition of the
//! power-on defaults), the card's fixed [`Limits`], and why settings are refused.

use thiserror::Error;
use vdaq_wire::control::Configure;
use vdaq_wire::{ClockMode, SampleFormat, SignalKind};

use super::signal::SignalParams;
use super::MAX_CHANNELS_LIMIT;

/// Acquisition settings (what CONFIGURE sets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Paced sample rate (Hz).
    pub rate_hz: u32,
    /// Channels per frame.
    pub channels: u16,
    /// Sample encoding.
    pub format: SampleFormat,
    /// Waveform.
    pub signal: SignalKind,
    /// Frequency of periodic signals (mHz).
    pub signal_freq_mhz: u32,
    /// Amplitude in ‰ of full scale.
    pub amplitude_permille: u16,
    /// Noise seed.
    pub seed: u64,
    /// Paced or free-running.
    pub clock: ClockMode,
    /// Latency bound (µs).
    pub latency_us: u32,
    /// FIFO watermark (frames).
    pub watermark_frames: u32,
    /// Completions per notification.
    pub coalesce_buffers: u16,
}

/// Fixed properties of the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most channels per frame.
    pub max_channels: u16,
    /// Lowest paced rate (Hz).
    pub min_rate_hz: u32,
    /// Highest paced rate (Hz).
    pub max_rate_hz: u32,
    /// FIFO depth (frames).
    pub fifo_frames: u32,
    /// Input range: µV the full-scale value stands for.
    pub full_scale_uv: u32,
}

impl Settings {
    /// The power-on settings: the one definition the CLI's defaults and the tests start
    /// from ([`Settings::default`]).
    pub const POWER_ON: Settings = Settings {
        rate_hz: 100_000,
        channels: 4,
        format: SampleFormat::S16,
        signal: SignalKind::Counter,
        signal_freq_mhz: 1_000_000,
        amplitude_permille: 900,
        seed: 0x5eed,
        clock: ClockMode::Paced,
        latency_us: 10_000,
        watermark_frames: 256,
        coalesce_buffers: 1,
    };
}

impl Default for Settings {
    fn default() -> Self {
        Settings::POWER_ON
    }
}

impl Limits {
    /// The standard card ([`Limits::default`]; the CLI can change channels and FIFO depth).
    pub const STANDARD: Limits = Limits {
        max_channels: 64,
        min_rate_hz: 1,
        max_rate_hz: 100_000_000,
        fifo_frames: 65_536,
        // ±10 V, the most common input range of DAQ cards.
        full_scale_uv: 10_000_000,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::STANDARD
    }
}

/// Why settings were refused (CONFIGURE answers INVALID; the CLI exits 2).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SettingsError {
    /// Rate outside the card's range.
    #[error("rate {rate} Hz is outside {min}..={max} Hz")]
    Rate {
        /// Requested.
        rate: u32,
        /// Lowest allowed.
        min: u32,
        /// Highest allowed.
        max: u32,
    },
    /// Channel count outside 1..=max.
    #[error("channel count {0} is outside 1..={1}")]
    Channels(u16, u16),
    /// Watermark outside 1..=FIFO depth.
    #[error("watermark {0} frames is outside 1..={1} (the FIFO depth)")]
    Watermark(u32, u32),
    /// Zero latency bound.
    #[error("latency bound must be at least 1 µs")]
    Latency,
    /// Zero coalescing count.
    #[error("interrupt coalescing must be at least 1 buffer")]
    Coalesce,
    /// Amplitude above full scale.
    #[error("amplitude {0}‰ exceeds 1000‰ (full scale)")]
    Amplitude(u16),
    /// Unknown sample format code.
    #[error("unknown sample format code {0}")]
    Format(u8),
    /// Unknown signal code.
    #[error("unknown signal code {0}")]
    Signal(u8),
    /// Unknown clock code.
    #[error("unknown clock mode code {0}")]
    Clock(u8),
}

impl Settings {
    /// Checks every field against `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<(), SettingsError> {
        if self.rate_hz < limits.min_rate_hz || self.rate_hz > limits.max_rate_hz {
            return Err(SettingsError::Rate {
                rate: self.rate_hz,
                min: limits.min_rate_hz,
                max: limits.max_rate_hz,
            });
        }
        if self.channels == 0 || self.channels > limits.max_channels.min(MAX_CHANNELS_LIMIT) {
            return Err(SettingsError::Channels(self.channels, limits.max_channels));
        }
        if self.watermark_frames == 0 || self.watermark_frames > limits.fifo_frames {
            return Err(SettingsError::Watermark(
                self.watermark_frames,
                limits.fifo_frames,
            ));
        }
        if self.latency_us == 0 {
            return Err(SettingsError::Latency);
        }
        if self.coalesce_buffers == 0 {
            return Err(SettingsError::Coalesce);
        }
        if self.amplitude_permille > 1000 {
            return Err(SettingsError::Amplitude(self.amplitude_permille));
        }
        Ok(())
    }

    /// Decodes a CONFIGURE payload.
    pub fn from_wire(cfg: &Configure) -> Result<Self, SettingsError> {
        Ok(Settings {
            rate_hz: cfg.rate_hz.get(),
            channels: cfg.channels.get(),
            format: SampleFormat::from_code(cfg.format).ok_or(SettingsError::Format(cfg.format))?,
            signal: SignalKind::from_code(cfg.signal).ok_or(SettingsError::Signal(cfg.signal))?,
            signal_freq_mhz: cfg.signal_freq_mhz.get(),
            amplitude_permille: cfg.amplitude_permille.get(),
            seed: cfg.seed.get(),
            clock: ClockMode::from_code(cfg.clock).ok_or(SettingsError::Clock(cfg.clock))?,
            latency_us: cfg.latency_us.get(),
            watermark_frames: cfg.watermark_frames.get(),
            coalesce_buffers: cfg.coalesce_buffers.get(),
        })
    }

    /// Encodes as a CONFIGURE payload.
    pub fn to_wire(&self) -> Configure {
        Configure {
            rate_hz: self.rate_hz.into(),
            latency_us: self.latency_us.into(),
            watermark_frames: self.watermark_frames.into(),
            signal_freq_mhz: self.signal_freq_mhz.into(),
            channels: self.channels.into(),
            coalesce_buffers: self.coalesce_buffers.into(),
            amplitude_permille: self.amplitude_permille.into(),
            format: self.format as u8,
            signal: self.signal as u8,
            seed: self.seed.into(),
            clock: self.clock as u8,
            reserved: [0; 7],
        }
    }

    pub(super) fn signal_params(&self) -> SignalParams {
        SignalParams {
            kind: self.signal,
            format: self.format,
            channels: self.channels,
            rate_hz: match self.clock {
                ClockMode::Paced => self.rate_hz,
                ClockMode::FreeRunning => 0,
            },
            freq_mhz: self.signal_freq_mhz,
            amplitude_permille: self.amplitude_permille,
            seed: self.seed,
        }
    }
}
