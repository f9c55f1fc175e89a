//! Wire format of the vdaq virtual data-acquisition device.
//!
//! This crate is the single definition of every number and layout that the device
//! (`vhost-device-daq`) and the guest driver must agree on: device ID, feature bits, queue
//! indices, the configuration space, the read-buffer header, control commands and events.
//! `docs/spec.md` is the normative text; the layout tests at the bottom of each module pin
//! sizes and offsets to it.
//!
//! All multi-byte fields are little-endian, as in every virtio 1.x device. Structures are
//! `#[repr(C)]` with explicit little-endian field types from `zerocopy`, so both sides can
//! view guest memory bytes as these structures without copying or `unsafe`.

#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;

// clap's derives name `std` paths; the feature is for host tools only.
#[cfg(feature = "clap")]
extern crate std;

pub mod buffer;
pub mod check;
pub mod config;
pub mod control;
pub mod event;
pub mod latency;
pub mod pattern;
pub mod report;
pub mod scan;
pub mod violation;

pub use zerocopy;

/// Virtio device ID the vdaq device presents.
///
/// Stock QEMU only attaches a generic vhost-user device whose ID it has a name for, and only
/// IDs ≤ 63 fit virtio-pci's device-ID scheme, so vdaq borrows ID 21 ("signal distribution
/// module"), which has no mainline Linux driver that could bind to it. A registered ID is the
/// way out: see `docs/spec.md`, "Device ID". The guest driver takes this as its default and
/// accepts an override; on the host the ID is QEMU's `virtio-id` property (the backend never
/// states it), so a deployment can move without a format change.
pub const VIRTIO_ID_DAQ: u16 = 21;

// virtio-pci derives the PCI device ID as 0x1040 + ID; QEMU's generic device only takes IDs
// up to 63.
const _: () = assert!(VIRTIO_ID_DAQ <= 63);

/// Name of the device model reported in the configuration space.
pub const MODEL_NAME: &[u8] = b"vdaq-sim";

/// Most channels a card may have (`max_channels`): a frame of 1024 S32 samples is 4 KiB.
pub const MAX_CHANNELS: u16 = 1024;

/// Firmware (device model) version reported in the configuration space: major << 16 | minor.
/// 1.1 added `tick_us` in what 1.0 had reserved (a minor only adds; docs/spec.md 5.x.1).
pub const FIRMWARE_VERSION: u32 = (1 << 16) | 1;

/// Virtqueue indices.
pub mod queue {
    /// Device-writable read buffers; the device fills them with samples.
    pub const DATA: u16 = 0;
    /// Driver commands (device-readable request, device-writable reply).
    pub const CONTROL: u16 = 1;
    /// Device-writable buffers the device fills with asynchronous events.
    pub const EVENT: u16 = 2;
    /// Number of virtqueues the device has.
    pub const COUNT: u16 = 3;
}

/// Feature bits (bit numbers, as in the virtio spec).
pub mod feature {
    /// The device fills `crc32` in every read-buffer header.
    pub const DAQ_F_CRC32: u32 = 0;
    /// The device supports the software TRIGGER command (TRIGGERED flag, TRIGGER events).
    pub const DAQ_F_TRIGGER: u32 = 1;
    /// Indirect descriptors (virtio 1.x, 6).
    pub const VIRTIO_F_INDIRECT_DESC: u32 = 28;
    /// used_event / avail_event notification suppression (virtio 1.x, 6).
    pub const VIRTIO_F_EVENT_IDX: u32 = 29;
    /// Virtio 1.x compliance (virtio 1.x, 6).
    pub const VIRTIO_F_VERSION_1: u32 = 32;

    /// Every feature a vdaq device offers.
    pub const DEVICE_FEATURES: u64 = (1 << DAQ_F_CRC32)
        | (1 << DAQ_F_TRIGGER)
        | (1 << VIRTIO_F_INDIRECT_DESC)
        | (1 << VIRTIO_F_EVENT_IDX)
        | (1 << VIRTIO_F_VERSION_1);
}

/// Sample encodings. Every sample is little-endian; frames interleave channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[repr(u8)]
pub enum SampleFormat {
    /// Signed 16-bit integer.
    S16 = 1,
    /// Signed 32-bit integer.
    S32 = 2,
    /// IEEE-754 single precision, full scale ±1.0.
    F32 = 3,
}

impl SampleFormat {
    /// All formats, in wire-code order.
    pub const ALL: [SampleFormat; 3] = [SampleFormat::S16, SampleFormat::S32, SampleFormat::F32];

    /// Decodes a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(SampleFormat::S16),
            2 => Some(SampleFormat::S32),
            3 => Some(SampleFormat::F32),
            _ => None,
        }
    }

    /// Name on command lines and in reports (`s16`, `s32`, `f32`).
    pub const fn name(self) -> &'static str {
        match self {
            SampleFormat::S16 => "s16",
            SampleFormat::S32 => "s32",
            SampleFormat::F32 => "f32",
        }
    }

    /// Bytes per sample.
    pub const fn sample_bytes(self) -> usize {
        match self {
            SampleFormat::S16 => 2,
            SampleFormat::S32 | SampleFormat::F32 => 4,
        }
    }

    /// Bit for this format in [`config::DaqConfig::supported_formats`].
    pub const fn mask(self) -> u32 {
        1 << (self as u8)
    }
}

/// Signal sources of the device's analog front end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[repr(u8)]
pub enum SignalKind {
    /// Sample n (frame × channels + channel) carries n itself, encoded per format: see [`pattern`].
    Counter = 0,
    /// Sine wave at `signal_freq_mhz`, channel c phase-shifted by c × 2π / channels.
    Sine = 1,
    /// Square wave, 50 % duty cycle.
    Square = 2,
    /// Rising sawtooth.
    Sawtooth = 3,
    /// Uniform white noise from a counter-based generator keyed by `seed`.
    Noise = 4,
    /// Samples replayed from a file on the host (a recording, WAV, CSV or raw), looping.
    File = 5,
}

impl SignalKind {
    /// Name on command lines and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            SignalKind::Counter => "counter",
            SignalKind::Sine => "sine",
            SignalKind::Square => "square",
            SignalKind::Sawtooth => "sawtooth",
            SignalKind::Noise => "noise",
            SignalKind::File => "file",
        }
    }

    /// Decodes a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(SignalKind::Counter),
            1 => Some(SignalKind::Sine),
            2 => Some(SignalKind::Square),
            3 => Some(SignalKind::Sawtooth),
            4 => Some(SignalKind::Noise),
            5 => Some(SignalKind::File),
            _ => None,
        }
    }
}

/// Sample clock modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[repr(u8)]
pub enum ClockMode {
    /// Frames are produced at `rate_hz` in real time; a full FIFO overruns.
    Paced = 0,
    /// Frames are produced as fast as the driver posts buffers; the FIFO never overruns.
    #[cfg_attr(feature = "clap", value(name = "free"))]
    FreeRunning = 1,
}

impl ClockMode {
    /// Name on command lines and in reports (`paced`, `free`).
    pub const fn name(self) -> &'static str {
        match self {
            ClockMode::Paced => "paced",
            ClockMode::FreeRunning => "free",
        }
    }

    /// Decodes a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(ClockMode::Paced),
            1 => Some(ClockMode::FreeRunning),
            _ => None,
        }
    }
}

/// Device acquisition state (`state` in the configuration space and in STATUS replies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DeviceState {
    /// Clock stopped; CONFIGURE is accepted.
    Stopped = 0,
    /// Clock running.
    Running = 1,
    /// The device met an error it cannot recover from by itself; the driver must reset it.
    NeedsReset = 2,
}

impl DeviceState {
    /// Decodes a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(DeviceState::Stopped),
            1 => Some(DeviceState::Running),
            2 => Some(DeviceState::NeedsReset),
            _ => None,
        }
    }
}

/// CRC-32 (ISO-HDLC, the zlib/Ethernet polynomial) of a read buffer's sample payload.
pub fn payload_crc32(payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(payload);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_features_include_version_1_and_event_idx() {
        assert_ne!(
            feature::DEVICE_FEATURES & (1 << feature::VIRTIO_F_VERSION_1),
            0
        );
        assert_ne!(
            feature::DEVICE_FEATURES & (1 << feature::VIRTIO_F_EVENT_IDX),
            0
        );
        assert_ne!(
            feature::DEVICE_FEATURES & (1 << feature::VIRTIO_F_INDIRECT_DESC),
            0
        );
    }

    #[test]
    fn codes_round_trip() {
        for format in SampleFormat::ALL {
            assert_eq!(SampleFormat::from_code(format as u8), Some(format));
        }
        assert_eq!(SampleFormat::from_code(0), None);
        for code in 0..=5 {
            assert_eq!(SignalKind::from_code(code).map(|s| s as u8), Some(code));
        }
        assert_eq!(SignalKind::from_code(6), None);
        assert_eq!(ClockMode::from_code(2), None);
        assert_eq!(DeviceState::from_code(3), None);
    }

    #[cfg(feature = "clap")]
    #[test]
    fn command_line_names_match_the_value_enums() {
        use clap::ValueEnum;
        let name = |value: Option<clap::builder::PossibleValue>| {
            value
                .map(|v| std::string::String::from(v.get_name()))
                .unwrap_or_default()
        };
        for format in SampleFormat::ALL {
            assert_eq!(name(format.to_possible_value()), format.name());
        }
        for code in 0..=5 {
            let signal = SignalKind::from_code(code).expect("signal code");
            assert_eq!(name(signal.to_possible_value()), signal.name());
        }
        for clock in [ClockMode::Paced, ClockMode::FreeRunning] {
            assert_eq!(name(clock.to_possible_value()), clock.name());
        }
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        // The CRC-32/ISO-HDLC check value over "123456789".
        assert_eq!(payload_crc32(b"123456789"), 0xcbf4_3926);
    }
}
