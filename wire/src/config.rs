//! The device configuration space (read through the transport's device-specific config).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of the configuration space in bytes.
pub const CONFIG_SIZE: usize = 136;

/// Length of the NUL-padded model name field.
pub const MODEL_LEN: usize = 24;

/// Device configuration space. Read-only for the driver: the device ignores config writes
/// (settings change through the CONFIGURE command, so they are acknowledged with a status).
///
/// The counters are live: every read returns the device's current values, but a 64-bit
/// counter read as two 32-bit accesses can tear; GET_STATUS returns one consistent snapshot.
/// The device raises a configuration-change notification only when it enters NEEDS_RESET.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DaqConfig {
    /// Most channels a frame may carry.
    pub max_channels: U16,
    /// Channels per frame now.
    pub channels: U16,
    /// Bit `1 << format` set for every supported [`crate::SampleFormat`].
    pub supported_formats: U32,
    /// Lowest paced sample rate (Hz).
    pub min_rate_hz: U32,
    /// Highest paced sample rate (Hz).
    pub max_rate_hz: U32,
    /// Paced sample rate now (Hz).
    pub rate_hz: U32,
    /// FIFO depth in frames.
    pub fifo_frames: U32,
    /// FIFO level (frames) at which the device moves data into the current buffer.
    pub watermark_frames: U32,
    /// Latency bound (µs): the longest a sampled frame waits before its buffer completes.
    pub latency_us: U32,
    /// Signal frequency (mHz) for periodic signals.
    pub signal_freq_mhz: U32,
    /// Completions per used-buffer notification (interrupt coalescing); 1 = no coalescing.
    pub coalesce_buffers: U16,
    /// Signal amplitude in ‰ of full scale.
    pub amplitude_permille: U16,
    /// [`crate::SampleFormat`] code now.
    pub format: u8,
    /// [`crate::SignalKind`] code now.
    pub signal: u8,
    /// [`crate::ClockMode`] code now.
    pub clock: u8,
    /// [`crate::DeviceState`] code.
    pub state: u8,
    /// Fault code that put the device in NEEDS_RESET, 0 if none.
    pub fault_code: U32,
    /// Seed of the noise generator.
    pub seed: U64,
    /// Frames sampled since reset (delivered + dropped + pending in the FIFO or the partly
    /// filled buffer).
    pub frames_produced: U64,
    /// Frames written into completed buffers since reset.
    pub frames_delivered: U64,
    /// Frames lost since reset: to overrun, or with a buffer the device could not write.
    pub frames_dropped: U64,
    /// Read buffers completed since reset.
    pub buffers_completed: U64,
    /// Malformed buffers or commands rejected since reset.
    pub requests_rejected: U64,
    /// Firmware version, major << 16 | minor.
    pub firmware_version: U32,
    /// Events dropped because the event queue had no buffer and the backlog was full.
    pub events_lost: U32,
    /// Device model name, NUL-padded ASCII.
    pub model: [u8; MODEL_LEN],
    /// Input range: the voltage, in µV, that the full-scale value stands for (S16 sample
    /// 2^15, S32 sample 2^31, F32 1.0); 0 if the card does not say. Drivers scale raw samples
    /// by it (IIO's `scale`).
    pub full_scale_uv: U32,
    /// Reserved, 0.
    pub reserved: U32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn config_layout_matches_spec() {
        assert_eq!(size_of::<DaqConfig>(), CONFIG_SIZE);
        assert_eq!(offset_of!(DaqConfig, max_channels), 0);
        assert_eq!(offset_of!(DaqConfig, channels), 2);
        assert_eq!(offset_of!(DaqConfig, supported_formats), 4);
        assert_eq!(offset_of!(DaqConfig, min_rate_hz), 8);
        assert_eq!(offset_of!(DaqConfig, max_rate_hz), 12);
        assert_eq!(offset_of!(DaqConfig, rate_hz), 16);
        assert_eq!(offset_of!(DaqConfig, fifo_frames), 20);
        assert_eq!(offset_of!(DaqConfig, watermark_frames), 24);
        assert_eq!(offset_of!(DaqConfig, latency_us), 28);
        assert_eq!(offset_of!(DaqConfig, signal_freq_mhz), 32);
        assert_eq!(offset_of!(DaqConfig, coalesce_buffers), 36);
        assert_eq!(offset_of!(DaqConfig, amplitude_permille), 38);
        assert_eq!(offset_of!(DaqConfig, format), 40);
        assert_eq!(offset_of!(DaqConfig, signal), 41);
        assert_eq!(offset_of!(DaqConfig, clock), 42);
        assert_eq!(offset_of!(DaqConfig, state), 43);
        assert_eq!(offset_of!(DaqConfig, fault_code), 44);
        assert_eq!(offset_of!(DaqConfig, seed), 48);
        assert_eq!(offset_of!(DaqConfig, frames_produced), 56);
        assert_eq!(offset_of!(DaqConfig, frames_delivered), 64);
        assert_eq!(offset_of!(DaqConfig, frames_dropped), 72);
        assert_eq!(offset_of!(DaqConfig, buffers_completed), 80);
        assert_eq!(offset_of!(DaqConfig, requests_rejected), 88);
        assert_eq!(offset_of!(DaqConfig, firmware_version), 96);
        assert_eq!(offset_of!(DaqConfig, events_lost), 100);
        assert_eq!(offset_of!(DaqConfig, model), 104);
        assert_eq!(offset_of!(DaqConfig, full_scale_uv), 128);
        assert_eq!(offset_of!(DaqConfig, reserved), 132);
    }
}
