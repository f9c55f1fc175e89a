//! Stream verification: what it means for a sequence of completed read buffers to be a valid
//! vdaq stream. Drivers, tests and the guest application share this one definition.

use zerocopy::FromBytes;

use crate::buffer::{flags, status, BufferHeader, HEADER_SIZE};
use crate::pattern::verify_counter;
use crate::SampleFormat;

/// Why a completed buffer is not a valid continuation of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamError {
    /// The used length cannot hold a header, or exceeds the posted buffer.
    UsedLength {
        /// Reported used length.
        used: usize,
        /// Posted buffer size.
        posted: usize,
    },
    /// The header's status is not OK.
    Status(u8),
    /// Unknown sample format code, or format/channels differ from what the stream expects.
    Format,
    /// `used - HEADER_SIZE` disagrees with the frame count.
    PayloadLength {
        /// Bytes the header announces.
        announced: usize,
        /// Bytes the used length covers.
        used: usize,
    },
    /// The completion sequence number skipped or repeated.
    Sequence {
        /// Expected.
        expected: u64,
        /// Found.
        found: u64,
    },
    /// Frames went missing (or repeated) without being reported as dropped.
    FrameGap {
        /// First frame expected (previous end + reported drops).
        expected: u64,
        /// First frame found.
        found: u64,
    },
    /// `dropped_frames` and the OVERRUN flag disagree.
    OverrunFlag,
    /// A sample does not follow the counter pattern.
    Pattern {
        /// Index of the bad sample within the buffer.
        sample: usize,
    },
    /// The payload CRC does not match.
    Crc {
        /// CRC in the header.
        header: u32,
        /// CRC computed over the payload.
        computed: u32,
    },
    /// CRC was required but the buffer carries none.
    MissingCrc,
    /// A buffer with frames is stamped earlier than the stream's previous buffer with frames
    /// (spec 5.x.6.1: the timestamps of buffers with frames never decrease within a stream).
    Timestamp {
        /// `timestamp_ns` of the previous buffer with frames.
        previous: u64,
        /// `timestamp_ns` found.
        found: u64,
    },
}

impl StreamError {
    /// What went wrong, for a report's `failure`.
    pub const fn describe(&self) -> &'static str {
        match self {
            StreamError::UsedLength { .. } => "used length does not fit the buffer",
            StreamError::Status(_) => "buffer header status not OK",
            StreamError::Format => "buffer format or channels differ from the stream's",
            StreamError::PayloadLength { .. } => {
                "buffer frame count disagrees with its used length"
            }
            StreamError::Sequence { .. } => "buffer sequence skipped or repeated",
            StreamError::FrameGap { .. } => "frames missing or repeated without a reported drop",
            StreamError::OverrunFlag => "dropped frames and the OVERRUN flag disagree",
            StreamError::Pattern { .. } => "samples failed verification",
            StreamError::Crc { .. } => "payload CRC mismatch",
            StreamError::MissingCrc => "buffer without the CRC required",
            StreamError::Timestamp { .. } => "buffer timestamp earlier than the previous one",
        }
    }
}

/// The header of one completed read buffer: the used length fits the posted `buffer` and
/// holds a header, and the header's status is OK. Stateless — what a driver checks of every
/// completion; [`StreamVerifier`] adds the stream's continuity on top.
pub fn completed_header(buffer: &[u8], used: usize) -> Result<BufferHeader, StreamError> {
    completed_header_in(buffer, used).copied()
}

/// [`completed_header`] in place: the header as it lies in `buffer`, not copied (a 64-byte
/// copy per buffer is a `rep movs` under TCG, a measurable share of a small buffer's check).
fn completed_header_in(buffer: &[u8], used: usize) -> Result<&BufferHeader, StreamError> {
    let used_length = StreamError::UsedLength {
        used,
        posted: buffer.len(),
    };
    if used < HEADER_SIZE || used > buffer.len() {
        return Err(used_length);
    }
    let header = BufferHeader::ref_from_bytes(&buffer[..HEADER_SIZE]).map_err(|_| used_length)?;
    if header.status != status::OK {
        return Err(StreamError::Status(header.status));
    }
    Ok(header)
}

/// Checks that the used length covers exactly the payload `header` announces (frames ×
/// channels × sample size, in a known format).
pub fn check_payload_length(header: &BufferHeader, used: usize) -> Result<(), StreamError> {
    let announced = header.payload_bytes().ok_or(StreamError::Format)?;
    let payload = used.saturating_sub(HEADER_SIZE);
    if announced != payload {
        return Err(StreamError::PayloadLength {
            announced,
            used: payload,
        });
    }
    Ok(())
}

/// Totals over the verified stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Buffers verified.
    pub buffers: u64,
    /// Buffers with no frames (flushed or stopped empty).
    pub empty_buffers: u64,
    /// Frames verified.
    pub frames: u64,
    /// Payload bytes verified.
    pub payload_bytes: u64,
    /// Frames the device reported dropped.
    pub dropped_frames: u64,
    /// Buffers flagged OVERRUN.
    pub overrun_buffers: u64,
    /// Buffers flagged TRIGGERED.
    pub triggered_buffers: u64,
    /// Buffers whose CRC was checked.
    pub crc_checked: u64,
    /// Buffers whose CRC did not match.
    pub crc_errors: u64,
    /// Buffers that failed verification.
    pub errors: u64,
}

impl core::ops::AddAssign for StreamStats {
    /// Sums the totals of two streams (the epochs of a stream a device reset cut).
    fn add_assign(&mut self, other: Self) {
        self.buffers += other.buffers;
        self.empty_buffers += other.empty_buffers;
        self.frames += other.frames;
        self.payload_bytes += other.payload_bytes;
        self.dropped_frames += other.dropped_frames;
        self.overrun_buffers += other.overrun_buffers;
        self.triggered_buffers += other.triggered_buffers;
        self.crc_checked += other.crc_checked;
        self.crc_errors += other.crc_errors;
        self.errors += other.errors;
    }
}

/// Checks completed buffers one after another.
#[derive(Clone, Debug)]
pub struct StreamVerifier {
    format: SampleFormat,
    channels: u16,
    counter_pattern: bool,
    require_crc: bool,
    next_sequence: u64,
    next_frame: Option<u64>,
    /// `timestamp_ns` of the last buffer with frames.
    last_timestamp: Option<u64>,
    stats: StreamStats,
}

impl StreamVerifier {
    /// A verifier for a stream of `format` × `channels`, starting at sequence 0. With
    /// `counter_pattern`, every sample of a buffer whose header names the counter signal is
    /// checked against the counter pattern.
    pub fn new(format: SampleFormat, channels: u16, counter_pattern: bool) -> Self {
        StreamVerifier {
            format,
            channels,
            counter_pattern,
            require_crc: false,
            next_sequence: 0,
            next_frame: None,
            last_timestamp: None,
            stats: StreamStats::default(),
        }
    }

    /// Require a valid CRC in every buffer (VIRTIO_DAQ_F_CRC32 negotiated).
    pub fn require_crc(mut self, required: bool) -> Self {
        self.require_crc = required;
        self
    }

    /// A verifier with the same checks for a new stream (the device was reset: sequence and
    /// stream index start over), its totals at zero.
    pub fn restarted(&self) -> Self {
        StreamVerifier::new(self.format, self.channels, self.counter_pattern)
            .require_crc(self.require_crc)
    }

    /// The stream's next buffer carries `sequence` (a stream joined after buffers the
    /// application did not verify: empty buffers a FLUSH returned).
    pub fn expecting_sequence(mut self, sequence: u64) -> Self {
        self.next_sequence = sequence;
        self
    }

    /// Totals so far.
    pub fn stats(&self) -> StreamStats {
        self.stats
    }

    /// Frame index the next buffer must start at (after adding its reported drops), once known.
    pub fn next_frame(&self) -> Option<u64> {
        self.next_frame
    }

    /// Verifies the next completed buffer: `buffer` is what was posted, `used` the used length
    /// the device reported. On error the verifier resynchronises on this buffer's header, so
    /// later buffers are judged on their own.
    pub fn check(&mut self, buffer: &[u8], used: usize) -> Result<BufferHeader, StreamError> {
        let result = self.check_inner(buffer, used);
        if let Err(err) = result {
            self.stats.errors += 1;
            if matches!(err, StreamError::Crc { .. }) {
                self.stats.crc_errors += 1;
            }
        }
        result
    }

    fn check_inner(&mut self, buffer: &[u8], used: usize) -> Result<BufferHeader, StreamError> {
        let header = completed_header_in(buffer, used)?;
        let sequence = header.sequence.get();
        let first_frame = header.first_frame.get();
        let frames = u64::from(header.frame_count.get());
        let dropped = header.dropped_frames.get();
        let header_flags = header.flags.get();
        // Resynchronise on this header whatever the verdict.
        let expected_sequence = core::mem::replace(&mut self.next_sequence, sequence + 1);
        let expected_frame = self
            .next_frame
            .replace(first_frame + frames)
            .map(|end| end + dropped);
        // Only buffers with frames are ordered in time: an empty buffer carries its completion
        // time, which the reference device's deterministic mode takes from another clock than
        // the virtual sample time of the buffers with frames.
        let previous_timestamp = if frames > 0 {
            self.last_timestamp.replace(header.timestamp_ns.get())
        } else {
            None
        };

        if header.format != self.format as u8 || header.channels.get() != self.channels {
            return Err(StreamError::Format);
        }
        check_payload_length(header, used)?;
        if sequence != expected_sequence {
            return Err(StreamError::Sequence {
                expected: expected_sequence,
                found: sequence,
            });
        }
        if (dropped > 0) != (header_flags & flags::OVERRUN != 0) {
            return Err(StreamError::OverrunFlag);
        }
        if let Some(expected) = expected_frame {
            // Empty buffers too: they report where the stream stands and the drops before it.
            if first_frame != expected {
                return Err(StreamError::FrameGap {
                    expected,
                    found: first_frame,
                });
            }
        }
        if let Some(previous) = previous_timestamp {
            let found = header.timestamp_ns.get();
            if found < previous {
                return Err(StreamError::Timestamp { previous, found });
            }
        }
        let payload = &buffer[HEADER_SIZE..used];
        if header_flags & flags::CRC_VALID != 0 {
            let computed = crate::payload_crc32(payload);
            if computed != header.crc32.get() {
                return Err(StreamError::Crc {
                    header: header.crc32.get(),
                    computed,
                });
            }
            self.stats.crc_checked += 1;
        } else if self.require_crc {
            return Err(StreamError::MissingCrc);
        }
        if self.counter_pattern && header.signal == crate::SignalKind::Counter as u8 {
            let first_sample = first_frame.wrapping_mul(u64::from(self.channels));
            if let Some(sample) = verify_counter(self.format, first_sample, payload) {
                return Err(StreamError::Pattern { sample });
            }
        }
        self.stats.buffers += 1;
        self.stats.frames += frames;
        self.stats.payload_bytes += payload.len() as u64;
        self.stats.dropped_frames += dropped;
        if frames == 0 {
            self.stats.empty_buffers += 1;
        }
        if dropped > 0 {
            self.stats.overrun_buffers += 1;
        }
        if header_flags & flags::TRIGGERED != 0 {
            self.stats.triggered_buffers += 1;
        }
        Ok(*header)
    }
}

/// The consume-only benchmark: the verification pass a consumer makes, over buffers already in
/// memory, no device involved. `ring` is cut into buffers of `buffer_len` bytes, each filled
/// with the counter stream a device would produce (`format`, `channels`); then
/// [`StreamVerifier::check`] runs over them, a fresh verifier per pass, until `min_ns` of
/// `now_ns` time has passed. Returns the verified payload rate in MiB/s (0 if nothing
/// verified), the ceiling a guest's consumer puts on its streaming rate.
pub fn consume_only_rate(
    format: SampleFormat,
    channels: u16,
    ring: &mut [u8],
    buffer_len: usize,
    min_ns: u64,
    now_ns: impl Fn() -> u64,
) -> f64 {
    let Some((frames, used)) = whole_frames(format, channels, ring.len(), buffer_len) else {
        return 0.0;
    };
    let mut first_frame = 0u64;
    for (sequence, bytes) in ring.chunks_exact_mut(buffer_len).enumerate() {
        let header = BufferHeader {
            sequence: (sequence as u64).into(),
            first_frame: first_frame.into(),
            frame_count: (frames as u32).into(),
            format: format as u8,
            channels: channels.into(),
            ..BufferHeader::default()
        };
        bytes[..HEADER_SIZE].copy_from_slice(zerocopy::IntoBytes::as_bytes(&header));
        crate::pattern::fill_counter(
            format,
            first_frame * u64::from(channels),
            &mut bytes[HEADER_SIZE..used],
        );
        first_frame += frames as u64;
    }
    let start = now_ns();
    let mut verified = 0u64;
    let mut elapsed = 0;
    while elapsed < min_ns {
        let mut verifier = StreamVerifier::new(format, channels, true);
        for buffer in ring.chunks_exact(buffer_len) {
            if verifier.check(buffer, used).is_ok() {
                verified += (used - HEADER_SIZE) as u64;
            }
        }
        elapsed = now_ns().saturating_sub(start);
    }
    verified as f64 / (1024.0 * 1024.0) / (elapsed.max(1) as f64 / 1e9)
}

/// The touch-only rate: the buffers [`consume_only_rate`] verifies, folded (XOR, eight bytes
/// at a time, in the verifier's loop shape) over the same payload bytes, nothing
/// checked: what reading every byte once costs this guest, the ceiling for verification.
/// `ring` is used as it is. MiB/s of `now_ns` time (0 if nothing was read).
pub fn touch_only_rate(
    format: SampleFormat,
    channels: u16,
    ring: &[u8],
    buffer_len: usize,
    min_ns: u64,
    now_ns: impl Fn() -> u64,
) -> f64 {
    let Some((_, used)) = whole_frames(format, channels, ring.len(), buffer_len) else {
        return 0.0;
    };
    let start = now_ns();
    let mut touched = 0u64;
    let mut fold = 0u64;
    let mut elapsed = 0;
    while elapsed < min_ns {
        for buffer in ring.chunks_exact(buffer_len) {
            fold ^= fold_words(&buffer[HEADER_SIZE..used]);
            touched += (used - HEADER_SIZE) as u64;
        }
        // The fold must be computed: nothing else reads it.
        core::hint::black_box(fold);
        elapsed = now_ns().saturating_sub(start);
    }
    touched as f64 / (1024.0 * 1024.0) / (elapsed.max(1) as f64 / 1e9)
}

/// The frames a buffer of `buffer_len` bytes holds and its used length (header and whole
/// frames), for the in-memory benchmarks; None if the buffer or the ring cannot hold one.
fn whole_frames(
    format: SampleFormat,
    channels: u16,
    ring_len: usize,
    buffer_len: usize,
) -> Option<(usize, usize)> {
    let frame_bytes = format.sample_bytes() * usize::from(channels);
    if buffer_len <= HEADER_SIZE || frame_bytes == 0 || ring_len < buffer_len {
        return None;
    }
    let frames = (buffer_len - HEADER_SIZE) / frame_bytes;
    Some((frames, HEADER_SIZE + frames * frame_bytes))
}

/// XOR of every eight-byte word of `bytes` (a trailing partial word is folded as well); four
/// words a round from `chunks_exact`, the loop shape of the counter check.
fn fold_words(bytes: &[u8]) -> u64 {
    let load = |word: &[u8]| u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
    let mut fold = 0u64;
    let mut rounds = bytes.chunks_exact(32);
    for round in &mut rounds {
        fold ^= load(&round[..8]) ^ load(&round[8..16]) ^ load(&round[16..24]) ^ load(&round[24..]);
    }
    let mut words = rounds.remainder().chunks_exact(8);
    for word in &mut words {
        fold ^= load(word);
    }
    for &byte in words.remainder() {
        fold ^= u64::from(byte);
    }
    fold
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::fill_counter;
    use zerocopy::IntoBytes;

    const FRAME: usize = 4; // 2 × S16

    /// A clock that advances 1 ms per reading: a benchmark's rate follows from its bytes.
    fn millisecond_clock() -> impl Fn() -> u64 {
        let ticks = core::cell::Cell::new(0u64);
        move || {
            ticks.set(ticks.get() + 1_000_000);
            ticks.get()
        }
    }

    #[test]
    fn consume_only_rate_verifies_the_stream_it_fills() {
        let now = millisecond_clock();
        let mut ring = [0u8; 3 * 256];
        let rate = consume_only_rate(SampleFormat::S16, 2, &mut ring, 256, 1, &now);
        // One pass of three buffers, each 192 payload bytes (48 frames), in 1 ms.
        let expected = 3.0 * 192.0 / (1024.0 * 1024.0) / 1e-3;
        assert!((rate - expected).abs() < 1e-9, "{rate} vs {expected}");
        let mut verifier = StreamVerifier::new(SampleFormat::S16, 2, true);
        for chunk in ring.chunks_exact(256) {
            assert!(verifier.check(chunk, HEADER_SIZE + 192).is_ok());
        }
        assert_eq!(
            consume_only_rate(SampleFormat::S16, 2, &mut ring, 32, 1, &now),
            0.0
        );
    }

    #[test]
    fn touch_only_rate_reads_the_payload_the_verifier_would() {
        let now = millisecond_clock();
        let ring = [0u8; 3 * 256];
        let rate = touch_only_rate(SampleFormat::S16, 2, &ring, 256, 1, &now);
        let expected = 3.0 * 192.0 / (1024.0 * 1024.0) / 1e-3;
        assert!((rate - expected).abs() < 1e-9, "{rate} vs {expected}");
        assert_eq!(
            touch_only_rate(SampleFormat::S16, 2, &ring, 32, 1, &now),
            0.0
        );
    }

    #[test]
    fn fold_words_sees_every_byte() {
        let bytes: [u8; 37] = core::array::from_fn(|i| i as u8);
        let fold = fold_words(&bytes);
        for i in 0..bytes.len() {
            let mut flipped = bytes;
            flipped[i] ^= 0x10;
            assert_ne!(fold_words(&flipped), fold, "byte {i}");
        }
    }

    fn buffer(sequence: u64, first_frame: u64, frames: u32, dropped: u64) -> [u8; 256] {
        let mut bytes = [0u8; 256];
        let header = BufferHeader {
            sequence: sequence.into(),
            first_frame: first_frame.into(),
            dropped_frames: dropped.into(),
            frame_count: frames.into(),
            flags: if dropped > 0 { flags::OVERRUN } else { 0 }.into(),
            format: SampleFormat::S16 as u8,
            channels: 2.into(),
            ..Default::default()
        };
        bytes[..HEADER_SIZE].copy_from_slice(header.as_bytes());
        fill_counter(
            SampleFormat::S16,
            first_frame * 2,
            &mut bytes[HEADER_SIZE..HEADER_SIZE + frames as usize * FRAME],
        );
        bytes
    }

    fn used(frames: u32) -> usize {
        HEADER_SIZE + frames as usize * FRAME
    }

    #[test]
    fn a_restarted_verifier_takes_a_new_stream_from_where_it_is_told() {
        let mut v = StreamVerifier::new(SampleFormat::S16, 2, true).require_crc(false);
        assert!(v.check(&buffer(0, 0, 10, 0), used(10)).is_ok());
        assert!(v.check(&buffer(1, 10, 10, 0), used(10)).is_ok());
        // After a reset the device numbers from 0 again, and the stream index too.
        let mut fresh = v.restarted();
        assert_eq!(fresh.stats(), StreamStats::default());
        assert!(fresh.check(&buffer(0, 0, 10, 0), used(10)).is_ok());
        // Joined after 3 buffers the application did not verify (empty, flushed).
        let mut joined = v.restarted().expecting_sequence(3);
        assert!(matches!(
            joined.check(&buffer(0, 0, 10, 0), used(10)),
            Err(StreamError::Sequence {
                expected: 3,
                found: 0
            })
        ));
        let mut joined = v.restarted().expecting_sequence(3);
        assert!(joined.check(&buffer(3, 0, 10, 0), used(10)).is_ok());
        assert_eq!(joined.stats().frames, 10);
    }

    #[test]
    fn a_continuous_stream_with_reported_drops_verifies() {
        let mut v = StreamVerifier::new(SampleFormat::S16, 2, true);
        assert!(v.check(&buffer(0, 0, 10, 0), used(10)).is_ok());
        assert!(v.check(&buffer(1, 10, 10, 0), used(10)).is_ok());
        assert!(v.check(&buffer(2, 25, 10, 5), used(10)).is_ok());
        let stats = v.stats();
        assert_eq!(stats.frames, 30);
        assert_eq!(stats.dropped_frames, 5);
        assert_eq!(stats.overrun_buffers, 1);
        assert_eq!(stats.errors, 0);
    }

    #[test]
    fn silent_gaps_sequence_skips_and_bad_samples_are_caught() {
        let mut v = StreamVerifier::new(SampleFormat::S16, 2, true);
        v.check(&buffer(0, 0, 10, 0), used(10)).expect("first");
        assert_eq!(
            v.check(&buffer(1, 12, 10, 0), used(10)),
            Err(StreamError::FrameGap {
                expected: 10,
                found: 12
            })
        );
        assert_eq!(
            v.check(&buffer(3, 22, 10, 0), used(10)),
            Err(StreamError::Sequence {
                expected: 2,
                found: 3
            })
        );
        let mut bad = buffer(4, 32, 10, 0);
        bad[HEADER_SIZE + 7 * 2] ^= 1;
        assert_eq!(
            v.check(&bad, used(10)),
            Err(StreamError::Pattern { sample: 7 })
        );
        assert_eq!(
            v.check(&buffer(5, 42, 10, 0), used(9)),
            Err(StreamError::PayloadLength {
                announced: 40,
                used: 36
            })
        );
        assert_eq!(
            v.check(&buffer(6, 52, 10, 0), 10),
            Err(StreamError::UsedLength {
                used: 10,
                posted: 256
            })
        );
        assert_eq!(v.stats().errors, 5);
    }

    #[test]
    fn overrun_flag_must_match_the_drop_count() {
        let mut v = StreamVerifier::new(SampleFormat::S16, 2, true);
        let mut b = buffer(0, 5, 10, 5);
        b[44] = 0; // clear OVERRUN
        v.next_frame = Some(0);
        assert_eq!(v.check(&b, used(10)), Err(StreamError::OverrunFlag));
    }

    /// spec: [6.11-1] with CRC32 negotiated, every OK buffer's CRC is checked; a mismatch is corrupt.
    #[test]
    fn crc_is_checked_when_flagged_and_required_when_asked() {
        let mut v = StreamVerifier::new(SampleFormat::S16, 2, true).require_crc(true);
        let mut b = buffer(0, 0, 10, 0);
        let crc = crate::payload_crc32(&b[HEADER_SIZE..used(10)]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b[44] |= flags::CRC_VALID as u8;
        assert!(v.check(&b, used(10)).is_ok());
        let mut corrupt = buffer(1, 10, 10, 0);
        corrupt[40..44].copy_from_slice(&crc.to_le_bytes());
        corrupt[44] |= flags::CRC_VALID as u8;
        assert!(matches!(
            v.check(&corrupt, used(10)),
            Err(StreamError::Crc { .. })
        ));
        assert_eq!(
            v.check(&buffer(2, 20, 10, 0), used(10)),
            Err(StreamError::MissingCrc)
        );
        assert_eq!(v.stats().crc_errors, 1);
        // An empty buffer's payload CRC is 0 (spec 5.x.6.11).
        let mut empty = buffer(3, 30, 0, 0);
        empty[44] |= flags::CRC_VALID as u8;
        assert!(v.check(&empty, used(0)).is_ok());
        let mut wrong = buffer(4, 30, 0, 0);
        wrong[44] |= flags::CRC_VALID as u8;
        wrong[40] = 1;
        assert_eq!(
            v.check(&wrong, used(0)),
            Err(StreamError::Crc {
                header: 1,
                computed: 0
            })
        );
    }

    /// `buffer` with `timestamp_ns` = `timestamp`.
    fn stamped(sequence: u64, first_frame: u64, frames: u32, timestamp: u64) -> [u8; 256] {
        let mut bytes = buffer(sequence, first_frame, frames, 0);
        bytes[16..24].copy_from_slice(&timestamp.to_le_bytes());
        bytes
    }

    /// spec: [6.1-3] a buffer with frames stamped before the previous one with frames is invalid.
    #[test]
    fn a_buffer_with_frames_stamped_before_the_previous_one_is_invalid() {
        let mut v = StreamVerifier::new(SampleFormat::S16, 2, true);
        v.check(&stamped(0, 0, 10, 1_000), used(10)).expect("first");
        v.check(&stamped(1, 10, 10, 1_000), used(10))
            .expect("the same time is no step back (a pause, a coarse clock)");
        v.check(&stamped(2, 20, 10, 2_000), used(10))
            .expect("later");
        // Empty buffers carry their completion time, from whatever clock: not compared.
        v.check(&stamped(3, 30, 0, 5), used(0))
            .expect("an empty buffer stamped earlier");
        v.check(&stamped(4, 30, 0, 9_000), used(0))
            .expect("an empty buffer stamped later");
        v.check(&stamped(5, 30, 10, 2_500), used(10))
            .expect("compared with the last buffer with frames, not the empty ones");
        assert_eq!(
            v.check(&stamped(6, 40, 10, 2_499), used(10)),
            Err(StreamError::Timestamp {
                previous: 2_500,
                found: 2_499
            })
        );
        // Resynchronised on the offending buffer: the next one is judged against it.
        v.check(&stamped(7, 50, 10, 2_499), used(10))
            .expect("after the error");
        assert_eq!(v.stats().errors, 1);
        assert_eq!(v.stats().buffers, 7);
    }

    /// spec: [6.3-5] a BAD_BUFFER header's `sequence` and `first_frame` are not the stream's.
    #[test]
    fn a_bad_buffer_header_does_not_move_the_stream() {
        let mut v = StreamVerifier::new(SampleFormat::S16, 2, true);
        v.check(&buffer(0, 0, 10, 0), used(10)).expect("first");
        let mut bad = buffer(77, 5_000, 0, 0);
        bad[46] = status::BAD_BUFFER;
        bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            v.check(&bad, HEADER_SIZE),
            Err(StreamError::Status(status::BAD_BUFFER))
        );
        assert_eq!(v.next_frame(), Some(10), "the stream stands where it stood");
        v.check(&buffer(1, 10, 10, 0), used(10))
            .expect("sequence and frames continue from the last OK buffer");
        assert_eq!(v.stats().frames, 20);
    }

    /// spec: [1-2] flag bits a later minor may define are ignored, not an error.
    #[test]
    fn unknown_flag_bits_are_ignored() {
        let mut v = StreamVerifier::new(SampleFormat::S16, 2, true);
        for (sequence, unknown) in [0x0200u16, 0x4000, 0x8000, !flags::ALL]
            .into_iter()
            .enumerate()
        {
            let mut b = buffer(sequence as u64, 10 * sequence as u64, 10, 0);
            b[44..46].copy_from_slice(&unknown.to_le_bytes());
            assert_eq!(unknown & flags::ALL, 0, "{unknown:#x} is not a known flag");
            let header = v.check(&b, used(10)).expect("unknown flags");
            assert_eq!(header.flags.get(), unknown);
        }
        assert_eq!(v.stats().errors, 0);
    }

    #[test]
    fn empty_flushed_buffers_do_not_break_continuity() {
        let mut v = StreamVerifier::new(SampleFormat::S16, 2, true);
        v.check(&buffer(0, 0, 10, 0), used(10)).expect("first");
        v.check(&buffer(1, 10, 0, 0), used(0)).expect("empty");
        v.check(&buffer(2, 10, 10, 0), used(10)).expect("continues");
        v.check(&buffer(3, 25, 0, 5), used(0))
            .expect("empty, reporting drops");
        v.check(&buffer(4, 25, 10, 0), used(10))
            .expect("continues after the drops");
        assert_eq!(
            v.check(&buffer(5, 40, 0, 0), used(0)),
            Err(StreamError::FrameGap {
                expected: 35,
                found: 40
            }),
            "an empty buffer may not hide a gap either"
        );
        assert_eq!(v.stats().empty_buffers, 2);
        assert_eq!(v.stats().dropped_frames, 5);
    }
}
