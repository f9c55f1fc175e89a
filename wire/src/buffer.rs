//! Read buffers on the data queue: a [`BufferHeader`] followed by interleaved frames.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of [`BufferHeader`] in bytes; the sample payload starts at this offset.
pub const HEADER_SIZE: usize = 64;

/// Most descriptors the device accepts in one chain (direct or indirect); longer chains are
/// rejected as malformed.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// Flag bits of [`BufferHeader::flags`].
pub mod flags {
    /// `dropped_frames` frames were lost to overrun right before this buffer's first frame.
    pub const OVERRUN: u16 = 1 << 0;
    /// Completed early because the driver asked for FLUSH.
    pub const FLUSHED: u16 = 1 << 1;
    /// A trigger fired in this buffer, at frame `trigger_frame`.
    pub const TRIGGERED: u16 = 1 << 2;
    /// Completed partly filled because the latency bound expired.
    pub const LATENCY: u16 = 1 << 3;
    /// Completed partly filled because acquisition stopped.
    pub const STOPPED: u16 = 1 << 4;
    /// `crc32` holds the CRC of the payload (VIRTIO_DAQ_F_CRC32 negotiated).
    pub const CRC_VALID: u16 = 1 << 5;
    /// The stream format (rate, channels, format or signal) changed at this buffer's first frame.
    pub const DISCONTINUITY: u16 = 1 << 6;
    /// Completed partly filled at a pause: the next frame was sampled after a STOP and START
    /// (a new clock run; frames continue without loss, timestamps jump).
    pub const PAUSED: u16 = 1 << 7;
    /// Completed partly filled because the signal changes at the next frame (the next buffer
    /// carries DISCONTINUITY).
    pub const SIGNAL_CHANGED: u16 = 1 << 8;
    /// Every flag defined; the others are reserved and 0.
    pub const ALL: u16 = OVERRUN
        | FLUSHED
        | TRIGGERED
        | LATENCY
        | STOPPED
        | CRC_VALID
        | DISCONTINUITY
        | PAUSED
        | SIGNAL_CHANGED;
}

/// Status codes of [`BufferHeader::status`].
pub mod status {
    /// The header and payload are valid.
    pub const OK: u8 = 0;
    /// The buffer was rejected: it has room for a header but not for a single frame.
    /// `frame_count` is 0. (Structurally malformed chains get used length 0 instead.)
    pub const BAD_BUFFER: u8 = 1;
}

/// Header the device writes at the start of every completed read buffer.
///
/// The used length the device reports is `HEADER_SIZE + frame_count × frame size`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct BufferHeader {
    /// Completion sequence number: 0 for the first buffer after reset, +1 per completed buffer.
    pub sequence: U64,
    /// Stream index of the first frame (counts dropped frames too).
    pub first_frame: U64,
    /// Device clock (ns) at which the first frame was sampled.
    pub timestamp_ns: U64,
    /// Frames lost to overrun between the previous buffer's last frame and `first_frame`.
    pub dropped_frames: U64,
    /// Frames in this buffer.
    pub frame_count: U32,
    /// Offset (in frames) of the trigger frame if `TRIGGERED` is set, else 0.
    pub trigger_frame: U32,
    /// CRC-32 of the payload if `CRC_VALID` is set, else 0.
    pub crc32: U32,
    /// [`flags`] bits.
    pub flags: U16,
    /// [`status`] code.
    pub status: u8,
    /// [`crate::SampleFormat`] code of the payload.
    pub format: u8,
    /// Channels per frame.
    pub channels: U16,
    /// [`crate::SignalKind`] code of the signal the payload carries (one per buffer).
    pub signal: u8,
    /// Reserved, zero.
    pub reserved0: u8,
    /// Sample rate (Hz) the frames were taken at; 0 in free-running mode.
    pub rate_hz: U32,
    /// Reserved, zero.
    pub reserved1: U64,
}

impl BufferHeader {
    /// Bytes of payload this header announces.
    pub fn payload_bytes(&self) -> Option<usize> {
        let format = crate::SampleFormat::from_code(self.format)?;
        (self.frame_count.get() as usize)
            .checked_mul(self.channels.get() as usize)?
            .checked_mul(format.sample_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn header_layout_matches_spec() {
        assert_eq!(size_of::<BufferHeader>(), HEADER_SIZE);
        assert_eq!(offset_of!(BufferHeader, sequence), 0);
        assert_eq!(offset_of!(BufferHeader, first_frame), 8);
        assert_eq!(offset_of!(BufferHeader, timestamp_ns), 16);
        assert_eq!(offset_of!(BufferHeader, dropped_frames), 24);
        assert_eq!(offset_of!(BufferHeader, frame_count), 32);
        assert_eq!(offset_of!(BufferHeader, trigger_frame), 36);
        assert_eq!(offset_of!(BufferHeader, crc32), 40);
        assert_eq!(offset_of!(BufferHeader, flags), 44);
        assert_eq!(offset_of!(BufferHeader, status), 46);
        assert_eq!(offset_of!(BufferHeader, format), 47);
        assert_eq!(offset_of!(BufferHeader, channels), 48);
        assert_eq!(offset_of!(BufferHeader, signal), 50);
        assert_eq!(offset_of!(BufferHeader, rate_hz), 52);
        assert_eq!(offset_of!(BufferHeader, reserved1), 56);
    }

    #[test]
    fn header_is_little_endian_on_the_wire() {
        let header = BufferHeader {
            sequence: 0x0102.into(),
            frame_count: 3.into(),
            ..Default::default()
        };
        let bytes = header.as_bytes();
        assert_eq!(&bytes[0..2], &[0x02, 0x01]);
        assert_eq!(bytes[32], 3);
        let parsed = BufferHeader::read_from_bytes(bytes).expect("64 bytes");
        assert_eq!(parsed, header);
    }

    #[test]
    fn payload_bytes_multiplies_frames_channels_and_sample_size() {
        let header = BufferHeader {
            frame_count: 10.into(),
            channels: 4.into(),
            format: crate::SampleFormat::S16 as u8,
            ..Default::default()
        };
        assert_eq!(header.payload_bytes(), Some(80));
        let unknown_format = BufferHeader {
            format: 9,
            ..header
        };
        assert_eq!(unknown_format.payload_bytes(), None);
    }
}
