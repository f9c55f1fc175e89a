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
/// The device raises a configuration-change notification when it enters NEEDS_RESET and
/// when its operator changes settings (never for counters or the driver's own commands).
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
    /// The device's time step (µs): every time-based rule is met within one tick after its
    /// deadline. Firmware 1.1 on; 0 on 1.0 devices (unknown).
    pub tick_us: U32,
}

/// Firmware major version this crate describes; a card with another major is another
/// interface (spec 5.x.1), while a newer minor only adds to it.
pub const FIRMWARE_MAJOR: u16 = (crate::FIRMWARE_VERSION >> 16) as u16;

/// Why a configuration space is not that of a vdaq card a driver can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityError {
    /// `firmware_version`'s major is not [`FIRMWARE_MAJOR`] (carries the field).
    FirmwareMajor(u32),
    /// `model` is empty, not printable ASCII, or not NUL-padded.
    Model,
    /// `max_channels` is 0, or above [`crate::MAX_CHANNELS`].
    MaxChannels(u16),
    /// `channels` is 0 or above `max_channels`.
    Channels(u16),
    /// `format` is unknown, or not among `supported_formats`.
    Format(u8),
    /// `min_rate_hz` is 0, above `max_rate_hz`, or `rate_hz` is outside them (paced clock).
    Rates,
    /// `fifo_frames` is 0.
    Fifo,
    /// `state` is no known code.
    State(u8),
}

/// A card's identity, as [`DaqConfig::identify`] found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Firmware major (always [`FIRMWARE_MAJOR`]).
    pub firmware_major: u16,
    /// Firmware minor: newer minors keep every field and rule of older ones.
    pub firmware_minor: u16,
    /// Length of the model name in `model`.
    pub model_len: usize,
}

/// Tick assumed when a firmware 1.0 device does not state it (`tick_us` 0).
pub const UNKNOWN_TICK_NS: u64 = 10_000_000;

impl DaqConfig {
    /// The device's tick (ns), or [`UNKNOWN_TICK_NS`] when it does not say.
    pub fn tick_ns(&self) -> u64 {
        match self.tick_us.get() {
            0 => UNKNOWN_TICK_NS,
            us => u64::from(us) * 1000,
        }
    }

    /// Longest a completed read may wait on the used ring, by the rules, before the device
    /// notifies (spec 5.x.6.7): a tick, plus `latency_us` when completions are coalesced. A
    /// lost-interrupt watchdog that fires sooner mistakes coalescing for a lost interrupt.
    pub fn notification_delay_bound_ns(&self) -> u64 {
        let coalescing = if self.coalesce_buffers.get() > 1 {
            u64::from(self.latency_us.get()) * 1000
        } else {
            0
        };
        coalescing.saturating_add(self.tick_ns())
    }

    /// Checks that this configuration space is a vdaq card's, with limits and settings a
    /// driver can stream with (spec 5.x.1, 5.x.4): device ID 21 is also another device type's,
    /// and the device is not trusted.
    pub fn identify(&self) -> Result<Identity, IdentityError> {
        let firmware = self.firmware_version.get();
        if (firmware >> 16) as u16 != FIRMWARE_MAJOR {
            return Err(IdentityError::FirmwareMajor(firmware));
        }
        let model_len = self.model.iter().position(|&b| b == 0).unwrap_or(MODEL_LEN);
        let (name, padding) = self.model.split_at(model_len);
        if name.is_empty()
            || !name.iter().all(|b| b.is_ascii_graphic() || *b == b' ')
            || padding.iter().any(|&b| b != 0)
        {
            return Err(IdentityError::Model);
        }
        let max_channels = self.max_channels.get();
        if max_channels == 0 || max_channels > crate::MAX_CHANNELS {
            return Err(IdentityError::MaxChannels(max_channels));
        }
        let channels = self.channels.get();
        if channels == 0 || channels > max_channels {
            return Err(IdentityError::Channels(channels));
        }
        let format_known = crate::SampleFormat::from_code(self.format).is_some();
        let format_bit = 1u32.checked_shl(u32::from(self.format)).unwrap_or(0);
        if !format_known || self.supported_formats.get() & format_bit == 0 {
            return Err(IdentityError::Format(self.format));
        }
        let (min, max, rate) = (
            self.min_rate_hz.get(),
            self.max_rate_hz.get(),
            self.rate_hz.get(),
        );
        let paced = self.clock == crate::ClockMode::Paced as u8;
        if min == 0 || min > max || (paced && !(min..=max).contains(&rate)) {
            return Err(IdentityError::Rates);
        }
        if self.fifo_frames.get() == 0 {
            return Err(IdentityError::Fifo);
        }
        if crate::DeviceState::from_code(self.state).is_none() {
            return Err(IdentityError::State(self.state));
        }
        Ok(Identity {
            firmware_major: FIRMWARE_MAJOR,
            firmware_minor: firmware as u16,
            model_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};
    use zerocopy::FromZeros;

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
        assert_eq!(offset_of!(DaqConfig, tick_us), 132);
    }

    fn reference_card() -> DaqConfig {
        let mut config = DaqConfig::new_zeroed();
        config.max_channels.set(64);
        config.channels.set(4);
        config.supported_formats.set(0x0e);
        config.min_rate_hz.set(1);
        config.max_rate_hz.set(100_000_000);
        config.rate_hz.set(48_000);
        config.fifo_frames.set(65_536);
        config.format = crate::SampleFormat::S16 as u8;
        config.firmware_version.set(crate::FIRMWARE_VERSION);
        config.model[..crate::MODEL_NAME.len()].copy_from_slice(crate::MODEL_NAME);
        config
    }

    /// spec: [1-1] a driver can tell a vdaq card from another device with ID 21.
    #[test]
    fn identify_accepts_the_reference_card_and_any_minor_of_its_major() {
        let card = reference_card();
        assert_eq!(card.identify().map(|id| id.model_len), Ok(8));
        let mut newer = card;
        newer.firmware_version.set(crate::FIRMWARE_VERSION | 7);
        assert_eq!(newer.identify().map(|id| id.firmware_minor), Ok(7));
    }

    /// spec: [1-1]
    #[test]
    fn identify_refuses_what_is_no_usable_vdaq_card() {
        let zeroed = DaqConfig::new_zeroed();
        assert_eq!(zeroed.identify(), Err(IdentityError::FirmwareMajor(0)));
        type Case = (&'static str, fn(&mut DaqConfig), IdentityError);
        let cases: [Case; 11] = [
            (
                "major 2",
                |c| c.firmware_version.set(2 << 16),
                IdentityError::FirmwareMajor(2 << 16),
            ),
            (
                "empty model",
                |c| c.model = [0; MODEL_LEN],
                IdentityError::Model,
            ),
            (
                "model not padded",
                |c| c.model[20] = b'x',
                IdentityError::Model,
            ),
            (
                "model not ASCII",
                |c| c.model[0] = 0xc3,
                IdentityError::Model,
            ),
            (
                "no channels at most",
                |c| c.max_channels.set(0),
                IdentityError::MaxChannels(0),
            ),
            (
                "no channels",
                |c| c.channels.set(0),
                IdentityError::Channels(0),
            ),
            (
                "more than the most",
                |c| c.channels.set(65),
                IdentityError::Channels(65),
            ),
            (
                "unsupported format",
                |c| c.supported_formats.set(0x04),
                IdentityError::Format(1),
            ),
            ("rate 0", |c| c.rate_hz.set(0), IdentityError::Rates),
            ("no FIFO", |c| c.fifo_frames.set(0), IdentityError::Fifo),
            ("unknown state", |c| c.state = 9, IdentityError::State(9)),
        ];
        for (what, spoil, expected) in cases {
            let mut card = reference_card();
            spoil(&mut card);
            assert_eq!(card.identify(), Err(expected), "{what}");
        }
    }

    /// spec: [6.7-1] a watchdog waits out the notification delay coalescing allows.
    #[test]
    fn the_notification_delay_bound_allows_for_coalescing_and_the_tick() {
        let mut card = reference_card();
        card.tick_us.set(1000);
        card.latency_us.set(50_000);
        card.coalesce_buffers.set(1);
        assert_eq!(card.notification_delay_bound_ns(), 1_000_000, "one tick");
        card.coalesce_buffers.set(8);
        assert_eq!(
            card.notification_delay_bound_ns(),
            51_000_000,
            "latency + tick"
        );
        card.tick_us.set(0);
        assert_eq!(
            card.notification_delay_bound_ns(),
            50_000_000 + UNKNOWN_TICK_NS
        );
    }
}
