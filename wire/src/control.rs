//! Control queue: a device-readable [`CommandHeader`] plus payload, then a device-writable
//! [`ResponseHeader`] plus payload, in one descriptor chain.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Command opcodes.
pub mod opcode {
    /// Start the sample clock. No payload.
    pub const START: u32 = 1;
    /// Stop the sample clock; the partly filled buffer completes with `STOPPED`. No payload.
    pub const STOP: u32 = 2;
    /// Change acquisition settings; payload [`super::Configure`]. Only while stopped.
    pub const CONFIGURE: u32 = 3;
    /// Software trigger: the next sampled frame is the trigger frame. No payload. Needs
    /// VIRTIO_DAQ_F_TRIGGER (otherwise UNSUPPORTED).
    pub const TRIGGER: u32 = 4;
    /// Complete every buffer the device holds, now. Reply payload [`super::FlushReply`].
    pub const FLUSH: u32 = 5;
    /// Report state, counters and the device clock. Reply payload [`super::Status`].
    pub const GET_STATUS: u32 = 6;
    /// Zero the counters (frames, buffers, rejected requests, lost events); frames pending at
    /// that moment stay counted as produced. The stream position is kept. No payload.
    pub const RESET_COUNTERS: u32 = 7;
    /// Arms (or disarms) the level/edge trigger; payload [`super::TriggerConfig`]. Needs
    /// VIRTIO_DAQ_F_TRIGGER.
    pub const SET_TRIGGER: u32 = 8;
}

/// Trigger conditions of [`TriggerConfig::mode`].
pub mod trigger_mode {
    /// Disarmed.
    pub const OFF: u8 = 0;
    /// Fires on a frame whose channel value is at or above the threshold.
    pub const LEVEL_ABOVE: u8 = 1;
    /// Fires on a frame whose channel value is at or below the threshold.
    pub const LEVEL_BELOW: u8 = 2;
    /// Fires where the channel crosses the threshold upwards (previous < threshold ≤ this).
    pub const RISING: u8 = 3;
    /// Fires where the channel crosses the threshold downwards (previous > threshold ≥ this).
    pub const FALLING: u8 = 4;
}

/// Command status codes of [`ResponseHeader::status`].
pub mod status {
    /// Done.
    pub const OK: u32 = 0;
    /// Unknown opcode.
    pub const UNSUPPORTED: u32 = 1;
    /// A payload field is out of range.
    pub const INVALID: u32 = 2;
    /// The request or reply area has the wrong size for this opcode, or the chain is malformed.
    pub const BAD_SIZE: u32 = 3;
    /// Not allowed in the current state (e.g. CONFIGURE while running).
    pub const BUSY: u32 = 4;
}

/// First bytes of every command.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct CommandHeader {
    /// One of [`opcode`].
    pub opcode: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

/// First bytes of every reply.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct ResponseHeader {
    /// One of [`status`].
    pub status: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

/// Payload of CONFIGURE. Every field is applied; the device rejects the whole command with
/// `INVALID` if any field is out of range (see the limits in the configuration space).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Configure {
    /// Paced sample rate (Hz), within `min_rate_hz..=max_rate_hz`.
    pub rate_hz: U32,
    /// Latency bound (µs), ≥ 1.
    pub latency_us: U32,
    /// FIFO watermark (frames), `1..=fifo_frames`.
    pub watermark_frames: U32,
    /// Signal frequency (mHz).
    pub signal_freq_mhz: U32,
    /// Channels per frame, `1..=max_channels`.
    pub channels: U16,
    /// Completions per notification, ≥ 1.
    pub coalesce_buffers: U16,
    /// Amplitude in ‰ of full scale, `0..=1000`.
    pub amplitude_permille: U16,
    /// [`crate::SampleFormat`] code.
    pub format: u8,
    /// [`crate::SignalKind`] code.
    pub signal: u8,
    /// Noise seed.
    pub seed: U64,
    /// [`crate::ClockMode`] code.
    pub clock: u8,
    /// Reserved, zero.
    pub reserved: [u8; 7],
}

/// Payload of SET_TRIGGER: a hardware (level/edge) trigger on one channel, evaluated on every
/// frame the device delivers. When it fires at frame T the buffer holding T is flagged
/// TRIGGERED (`trigger_frame` = its offset) and a TRIGGER event is raised; the capture window
/// is frames T … T + `post_frames` − 1 of the stream, and the trigger re-arms after the
/// window's last frame.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct TriggerConfig {
    /// One of [`trigger_mode`].
    pub mode: u8,
    /// Reserved, zero.
    pub reserved: u8,
    /// Channel watched, `0..channels`.
    pub channel: U16,
    /// Threshold in millionths of full scale (−1 000 000 … 1 000 000), two's complement.
    pub threshold_ppm: U32,
    /// Frames of the window before the trigger frame: must be 0 (the device keeps no
    /// pre-trigger history; other values are INVALID).
    pub pre_frames: U32,
    /// Frames of the window from the trigger frame on (≥ 1).
    pub post_frames: U32,
}

/// Reply payload of FLUSH.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct FlushReply {
    /// Read buffers the device returned because of this FLUSH.
    pub buffers_returned: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

/// Reply payload of GET_STATUS.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Status {
    /// Device clock (ns) when the reply was written; correlates device and driver time.
    pub device_time_ns: U64,
    /// Frames sampled since reset.
    pub frames_produced: U64,
    /// Frames written into completed buffers since reset.
    pub frames_delivered: U64,
    /// Frames lost since reset (overrun, or unwritable buffers).
    pub frames_dropped: U64,
    /// Read buffers completed since reset.
    pub buffers_completed: U64,
    /// Read buffers the device holds now (posted, not yet completed).
    pub buffers_held: U64,
    /// Frames sampled but not yet in a completed buffer (FIFO plus the partly filled buffer).
    /// `frames_produced = frames_delivered + frames_dropped + frames_pending`.
    pub frames_pending: U64,
    /// Malformed buffers or commands rejected since reset.
    pub requests_rejected: U64,
    /// [`crate::DeviceState`] code.
    pub state: u8,
    /// Reserved, zero.
    pub reserved: [u8; 7],
}

/// A command the device knows, typed ([`opcode`] holds the wire codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Opcode {
    /// [`opcode::START`].
    Start = opcode::START,
    /// [`opcode::STOP`].
    Stop = opcode::STOP,
    /// [`opcode::CONFIGURE`].
    Configure = opcode::CONFIGURE,
    /// [`opcode::TRIGGER`].
    Trigger = opcode::TRIGGER,
    /// [`opcode::FLUSH`].
    Flush = opcode::FLUSH,
    /// [`opcode::GET_STATUS`].
    GetStatus = opcode::GET_STATUS,
    /// [`opcode::RESET_COUNTERS`].
    ResetCounters = opcode::RESET_COUNTERS,
    /// [`opcode::SET_TRIGGER`].
    SetTrigger = opcode::SET_TRIGGER,
}

impl Opcode {
    /// Every opcode, in code order.
    pub const ALL: [Opcode; 8] = [
        Opcode::Start,
        Opcode::Stop,
        Opcode::Configure,
        Opcode::Trigger,
        Opcode::Flush,
        Opcode::GetStatus,
        Opcode::ResetCounters,
        Opcode::SetTrigger,
    ];

    /// The wire code.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// Decodes a wire code; `None` for opcodes the device does not know (UNSUPPORTED).
    pub fn from_code(code: u32) -> Option<Self> {
        Opcode::ALL.into_iter().find(|op| op.code() == code)
    }

    /// Size of the command payload.
    pub const fn payload_size(self) -> usize {
        match self {
            Opcode::Configure => core::mem::size_of::<Configure>(),
            Opcode::SetTrigger => core::mem::size_of::<TriggerConfig>(),
            _ => 0,
        }
    }

    /// Size of the reply payload (0 for commands that reply with a bare header).
    pub const fn reply_payload_size(self) -> usize {
        match self {
            Opcode::Flush => core::mem::size_of::<FlushReply>(),
            Opcode::GetStatus => core::mem::size_of::<Status>(),
            _ => 0,
        }
    }
}

/// A reply status, typed ([`status`] holds the wire codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum CommandStatus {
    /// [`status::OK`].
    Ok = status::OK,
    /// [`status::UNSUPPORTED`].
    Unsupported = status::UNSUPPORTED,
    /// [`status::INVALID`].
    Invalid = status::INVALID,
    /// [`status::BAD_SIZE`].
    BadSize = status::BAD_SIZE,
    /// [`status::BUSY`].
    Busy = status::BUSY,
}

impl CommandStatus {
    /// The wire code.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// Decodes a wire code; `None` for codes this version does not define.
    pub fn from_code(code: u32) -> Option<Self> {
        [
            CommandStatus::Ok,
            CommandStatus::Unsupported,
            CommandStatus::Invalid,
            CommandStatus::BadSize,
            CommandStatus::Busy,
        ]
        .into_iter()
        .find(|status| status.code() == code)
    }
}

/// Size of the reply payload for `opcode` (0 for commands that reply with a bare header, and
/// for unknown opcodes).
pub fn reply_payload_size(opcode: u32) -> usize {
    Opcode::from_code(opcode).map_or(0, Opcode::reply_payload_size)
}

/// Size of the command payload for `opcode`, or `None` for unknown opcodes.
pub fn command_payload_size(opcode: u32) -> Option<usize> {
    Opcode::from_code(opcode).map(Opcode::payload_size)
}

/// Bytes of a command or reply header.
pub const HEADER_BYTES: usize = core::mem::size_of::<CommandHeader>();

/// Largest control request (header + payload) a device reads; a longer one is BAD_SIZE.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// Why bytes do not frame a command or a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than a header.
    Short {
        /// Bytes there are.
        len: usize,
    },
    /// The output area cannot hold header and payload.
    NoRoom {
        /// Bytes needed.
        needed: usize,
        /// Bytes there are.
        len: usize,
    },
}

fn write_framed(header: &[u8], payload: &[u8], out: &mut [u8]) -> Result<usize, FrameError> {
    let needed = header.len() + payload.len();
    let Some(area) = out.get_mut(..needed) else {
        return Err(FrameError::NoRoom {
            needed,
            len: out.len(),
        });
    };
    let (head, rest) = area.split_at_mut(header.len());
    head.copy_from_slice(header);
    rest.copy_from_slice(payload);
    Ok(needed)
}

fn split_framed<H: FromBytes>(bytes: &[u8]) -> Result<(H, &[u8]), FrameError> {
    H::read_from_prefix(bytes).map_err(|_| FrameError::Short { len: bytes.len() })
}

/// Writes a command (header with `opcode`, then `payload`) into `out`; returns its length.
/// `opcode` is a raw code so that drivers and tests can also send codes the device does not
/// know.
pub fn encode_command(opcode: u32, payload: &[u8], out: &mut [u8]) -> Result<usize, FrameError> {
    let header = CommandHeader {
        opcode: opcode.into(),
        reserved: 0.into(),
    };
    write_framed(header.as_bytes(), payload, out)
}

/// Splits a command the driver wrote into its opcode code and payload.
pub fn decode_command(request: &[u8]) -> Result<(u32, &[u8]), FrameError> {
    split_framed::<CommandHeader>(request).map(|(header, payload)| (header.opcode.get(), payload))
}

/// Writes a reply (header with `status`, then `payload`) into `out`; returns its length.
pub fn encode_reply(
    status: CommandStatus,
    payload: &[u8],
    out: &mut [u8],
) -> Result<usize, FrameError> {
    let header = ResponseHeader {
        status: status.code().into(),
        reserved: 0.into(),
    };
    write_framed(header.as_bytes(), payload, out)
}

/// Splits the used part of a reply (the device's bytes, `used` long) into the raw status code
/// and the payload. The status stays raw: a device may answer with codes this version does not
/// define, which [`CommandStatus::from_code`] reports as `None`.
pub fn decode_reply(reply: &[u8]) -> Result<(u32, &[u8]), FrameError> {
    split_framed::<ResponseHeader>(reply).map(|(header, payload)| (header.status.get(), payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn control_layouts_match_spec() {
        assert_eq!(size_of::<CommandHeader>(), 8);
        assert_eq!(size_of::<ResponseHeader>(), 8);
        assert_eq!(size_of::<Configure>(), 40);
        assert_eq!(offset_of!(Configure, rate_hz), 0);
        assert_eq!(offset_of!(Configure, latency_us), 4);
        assert_eq!(offset_of!(Configure, watermark_frames), 8);
        assert_eq!(offset_of!(Configure, signal_freq_mhz), 12);
        assert_eq!(offset_of!(Configure, channels), 16);
        assert_eq!(offset_of!(Configure, coalesce_buffers), 18);
        assert_eq!(offset_of!(Configure, amplitude_permille), 20);
        assert_eq!(offset_of!(Configure, format), 22);
        assert_eq!(offset_of!(Configure, signal), 23);
        assert_eq!(offset_of!(Configure, seed), 24);
        assert_eq!(offset_of!(Configure, clock), 32);
        assert_eq!(size_of::<FlushReply>(), 8);
        assert_eq!(size_of::<TriggerConfig>(), 16);
        assert_eq!(offset_of!(TriggerConfig, channel), 2);
        assert_eq!(offset_of!(TriggerConfig, threshold_ppm), 4);
        assert_eq!(offset_of!(TriggerConfig, pre_frames), 8);
        assert_eq!(offset_of!(TriggerConfig, post_frames), 12);
        assert_eq!(size_of::<Status>(), 72);
        assert_eq!(offset_of!(Status, device_time_ns), 0);
        assert_eq!(offset_of!(Status, buffers_held), 40);
        assert_eq!(offset_of!(Status, frames_pending), 48);
        assert_eq!(offset_of!(Status, requests_rejected), 56);
        assert_eq!(offset_of!(Status, state), 64);
    }

    #[test]
    fn typed_codes_round_trip_and_match_the_wire_constants() {
        for op in Opcode::ALL {
            assert_eq!(Opcode::from_code(op.code()), Some(op));
        }
        assert_eq!(Opcode::Start.code(), opcode::START);
        assert_eq!(Opcode::SetTrigger.code(), opcode::SET_TRIGGER);
        assert_eq!(Opcode::from_code(0), None);
        assert_eq!(Opcode::from_code(9), None);
        assert_eq!(
            CommandStatus::from_code(status::BUSY),
            Some(CommandStatus::Busy)
        );
        assert_eq!(CommandStatus::from_code(5), None);
    }

    #[test]
    fn commands_and_replies_frame_and_unframe() {
        let mut out = [0u8; 64];
        let configure = Configure::default();
        let len =
            encode_command(opcode::CONFIGURE, configure.as_bytes(), &mut out).expect("room for it");
        assert_eq!(len, HEADER_BYTES + 40);
        assert_eq!(&out[..4], &opcode::CONFIGURE.to_le_bytes());
        let (code, payload) = decode_command(&out[..len]).expect("framed");
        assert_eq!(code, opcode::CONFIGURE);
        assert_eq!(payload, configure.as_bytes());
        assert_eq!(
            encode_command(opcode::START, &[0; 60], &mut out),
            Err(FrameError::NoRoom {
                needed: 68,
                len: 64
            })
        );

        let flushed = FlushReply {
            buffers_returned: 3.into(),
            reserved: 0.into(),
        };
        let len = encode_reply(CommandStatus::Busy, flushed.as_bytes(), &mut out).expect("room");
        let (status_code, payload) = decode_reply(&out[..len]).expect("framed");
        assert_eq!(status_code, status::BUSY);
        assert_eq!(payload, flushed.as_bytes());
        assert_eq!(decode_reply(&out[..7]), Err(FrameError::Short { len: 7 }));
        assert_eq!(decode_command(&[]), Err(FrameError::Short { len: 0 }));
    }

    #[test]
    fn sizes_per_opcode() {
        assert_eq!(command_payload_size(opcode::CONFIGURE), Some(40));
        assert_eq!(command_payload_size(opcode::START), Some(0));
        assert_eq!(command_payload_size(99), None);
        assert_eq!(reply_payload_size(opcode::GET_STATUS), 72);
        assert_eq!(reply_payload_size(opcode::FLUSH), 8);
        assert_eq!(reply_payload_size(opcode::STOP), 0);
    }
}
