//! File signal sources (replay) and the recording format.
//!
//! A source is loaded once into full-scale samples (interleaved, [-1, 1]) and replayed in a
//! loop: frame n takes the source's frame n mod length, encoded in the device's format.
//! Supported files, by extension:
//! - `.vdaqrec`: a recording made with `--record` (the exact buffers the device delivered);
//! - `.wav`: RIFF/WAVE PCM, 16- or 32-bit integer or 32-bit float;
//! - `.csv`: one frame per line, comma-separated values in [-1, 1];
//! - anything else: raw little-endian samples in the device's format, interleaved.
//!
//! Hand-rolled: the WAV subset is a few dozen lines, and no maintained crate reads the other
//! three.

use std::path::Path;

use thiserror::Error;
use vdaq_wire::buffer::{status, BufferHeader, HEADER_SIZE};
use vdaq_wire::zerocopy::FromBytes;
use vdaq_wire::SampleFormat;

use super::signal::encode_analog;

/// First bytes of a recording file.
pub const RECORDING_MAGIC: &[u8; 8] = b"VDAQREC1";

/// Why a source file cannot be used.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The contents are not what the extension says.
    #[error("{path}: {reason}")]
    Format {
        /// File.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Samples to replay.
#[derive(Clone, Debug, PartialEq)]
pub struct FileSource {
    /// Channels per frame in the file.
    pub channels: u16,
    /// Interleaved full-scale samples.
    pub samples: Vec<f64>,
}

/// Decodes one sample to full scale ([-1, 1]).
pub fn decode(format: SampleFormat, bytes: &[u8]) -> f64 {
    match format {
        // Full scale is 2^15 / 2^31, matching `encode_analog`, so integers round-trip exactly.
        SampleFormat::S16 => f64::from(i16::from_le_bytes([bytes[0], bytes[1]])) / 32_768.0,
        SampleFormat::S32 => {
            f64::from(i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
                / 2_147_483_648.0
        }
        SampleFormat::F32 => {
            f64::from(f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
        }
    }
}

/// The buffers of a recording (`bytes` is the whole file), each header with its payload, in
/// order; an error names the byte offset where the file stops making sense.
pub fn recording_buffers(
    bytes: &[u8],
) -> Result<impl Iterator<Item = Result<(BufferHeader, &[u8]), String>> + '_, String> {
    let body = bytes
        .strip_prefix(RECORDING_MAGIC.as_slice())
        .ok_or("not a vdaq recording (magic VDAQREC1 missing)")?;
    let mut offset = 0;
    Ok(std::iter::from_fn(move || {
        if offset >= body.len() {
            return None;
        }
        let at = offset + RECORDING_MAGIC.len();
        let buffer = (|| {
            let header = body
                .get(offset..offset + HEADER_SIZE)
                .and_then(|h| BufferHeader::read_from_bytes(h).ok())
                .ok_or_else(|| format!("truncated buffer header at byte {at}"))?;
            let payload = header
                .payload_bytes()
                .filter(|_| header.status == status::OK)
                .ok_or_else(|| format!("bad buffer header at byte {at}"))?;
            let data = body
                .get(offset + HEADER_SIZE..offset + HEADER_SIZE + payload)
                .ok_or_else(|| format!("truncated payload at byte {at}"))?;
            Ok((header, data))
        })();
        // After an error nothing further can be located: stop there.
        offset = match &buffer {
            Ok((_, data)) => offset + HEADER_SIZE + data.len(),
            Err(_) => body.len(),
        };
        Some(buffer)
    }))
}

impl FileSource {
    /// Loads `path`; `format` and `channels` are the device's (used for raw files).
    pub fn load(path: &Path, format: SampleFormat, channels: u16) -> Result<Self, SourceError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| SourceError::Read {
            path: name.clone(),
            source,
        })?;
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        Self::parse(&name, &extension, &bytes, format, channels)
    }

    /// Parses a file's `bytes` as its `extension` says (`vdaqrec`, `wav`, `csv`, anything else
    /// raw); `name` is for messages. Everything in `bytes` is untrusted.
    pub fn parse(
        name: &str,
        extension: &str,
        bytes: &[u8],
        format: SampleFormat,
        channels: u16,
    ) -> Result<Self, SourceError> {
        let bad = |reason: String| SourceError::Format {
            path: name.to_string(),
            reason,
        };
        let source = match extension {
            "vdaqrec" => Self::from_recording(bytes).map_err(bad)?,
            "wav" => Self::from_wav(bytes).map_err(bad)?,
            "csv" => Self::from_csv(bytes).map_err(bad)?,
            _ => Self::from_raw(bytes, format, channels).map_err(bad)?,
        };
        let mut source = source;
        // Whole frames only: a trailing partial frame is dropped, and at least one must stay.
        let channels = usize::from(source.channels.max(1));
        let whole = source.samples.len() / channels * channels;
        source.samples.truncate(whole);
        if source.samples.is_empty() {
            return Err(bad(format!("no complete frame of {channels} channels")));
        }
        Ok(source)
    }

    fn from_raw(bytes: &[u8], format: SampleFormat, channels: u16) -> Result<Self, String> {
        let frame = format.sample_bytes() * usize::from(channels);
        if bytes.len() % frame != 0 {
            return Err(format!(
                "{} bytes is not a whole number of {frame}-byte frames ({channels} × {format:?})",
                bytes.len()
            ));
        }
        Ok(FileSource {
            channels,
            samples: bytes
                .chunks_exact(format.sample_bytes())
                .map(|s| decode(format, s))
                .collect(),
        })
    }

    fn from_recording(bytes: &[u8]) -> Result<Self, String> {
        let mut samples = Vec::new();
        let mut channels = None;
        for buffer in recording_buffers(bytes)? {
            let (header, data) = buffer?;
            if *channels.get_or_insert(header.channels.get()) != header.channels.get() {
                return Err("the channel count changes within the recording".into());
            }
            let format = SampleFormat::from_code(header.format).ok_or("unknown format")?;
            samples.extend(
                data.chunks_exact(format.sample_bytes())
                    .map(|s| decode(format, s)),
            );
        }
        Ok(FileSource {
            channels: channels.ok_or("empty recording")?,
            samples,
        })
    }

    fn from_wav(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
            return Err("not a RIFF/WAVE file".into());
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let mut offset = 12;
        let mut fmt = None;
        while offset + 8 <= bytes.len() {
            let id = &bytes[offset..offset + 4];
            let size = u32_at(offset + 4) as usize;
            let body = offset + 8;
            let end = body
                .checked_add(size)
                .filter(|&e| e <= bytes.len())
                .ok_or("truncated chunk")?;
            match id {
                b"fmt " if size >= 16 => {
                    fmt = Some((u16_at(body), u16_at(body + 2), u16_at(body + 14)));
                }
                b"data" => {
                    let (tag, channels, bits) = fmt.ok_or("data chunk before fmt chunk")?;
                    let format = match (tag, bits) {
                        (1, 16) => SampleFormat::S16,
                        (1, 32) => SampleFormat::S32,
                        (3, 32) => SampleFormat::F32,
                        _ => {
                            return Err(format!(
                                "unsupported WAV encoding (tag {tag}, {bits} bits); use 16/32-bit PCM or 32-bit float"
                            ))
                        }
                    };
                    if channels == 0 {
                        return Err("WAV with 0 channels".into());
                    }
                    return Ok(FileSource {
                        channels,
                        samples: bytes[body..end]
                            .chunks_exact(format.sample_bytes())
                            .map(|s| decode(format, s))
                            .collect(),
                    });
                }
                _ => {}
            }
            offset = end + (size & 1);
        }
        Err("no data chunk".into())
    }

    fn from_csv(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text")?;
        let mut samples = Vec::new();
        let mut channels = None;
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let values: Result<Vec<f64>, _> = line.split(',').map(|v| v.trim().parse()).collect();
            let values = values.map_err(|_| format!("line {}: not numbers", index + 1))?;
            if *channels.get_or_insert(values.len()) != values.len() {
                return Err(format!(
                    "line {}: {} values, expected {}",
                    index + 1,
                    values.len(),
                    channels.unwrap_or(0)
                ));
            }
            samples.extend(values);
        }
        Ok(FileSource {
            channels: u16::try_from(channels.ok_or("no frames")?)
                .map_err(|_| "too many columns")?,
            samples,
        })
    }

    /// Frames in the source.
    pub fn frames(&self) -> u64 {
        (self.samples.len() / usize::from(self.channels.max(1))) as u64
    }

    /// Writes frames `first_frame..` (looping over the source) into `out` in `format`.
    pub fn render(&self, format: SampleFormat, first_frame: u64, out: &mut [u8]) {
        let channels = usize::from(self.channels);
        let frames = self.frames().max(1);
        let size = format.sample_bytes();
        for (i, frame) in out.chunks_exact_mut(size * channels).enumerate() {
            let index = ((first_frame + i as u64) % frames) as usize * channels;
            for (c, sample) in frame.chunks_exact_mut(size).enumerate() {
                encode_analog(format, self.samples[index + c], sample);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdaq_wire::zerocopy::IntoBytes;

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        path
    }

    #[test]
    fn raw_s16_replays_bit_exact() {
        let dir = tempfile::tempdir().expect("dir");
        let samples: Vec<i16> = vec![0, 1, -1, i16::MAX, i16::MIN, 1234];
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        let path = write(&dir, "x.raw", &bytes);
        let source = FileSource::load(&path, SampleFormat::S16, 2).expect("load");
        assert_eq!(source.frames(), 3);
        let mut out = vec![0u8; bytes.len() * 2];
        source.render(SampleFormat::S16, 0, &mut out);
        assert_eq!(&out[..bytes.len()], &bytes[..], "exact");
        assert_eq!(&out[bytes.len()..], &bytes[..], "loops");
        assert!(
            FileSource::load(&write(&dir, "odd.raw", &[1, 2, 3]), SampleFormat::S16, 2).is_err()
        );
    }

    #[test]
    fn csv_and_wav_load() {
        let dir = tempfile::tempdir().expect("dir");
        let csv = FileSource::load(
            &write(&dir, "x.csv", b"# t\n0.5, -0.5\n1,0\n"),
            SampleFormat::F32,
            2,
        )
        .expect("csv");
        assert_eq!(csv.samples, vec![0.5, -0.5, 1.0, 0.0]);
        assert!(
            FileSource::load(&write(&dir, "bad.csv", b"1,2\n3\n"), SampleFormat::F32, 2)
                .is_err_and(|e| e.to_string().contains("line 2"))
        );
        let data: Vec<u8> = [100i16, -100, 200, -200]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let mut wav = Vec::new();
        wav.extend_from_slice(b"RIFF");
        wav.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
        wav.extend_from_slice(b"WAVEfmt ");
        wav.extend_from_slice(&16u32.to_le_bytes());
        wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
        wav.extend_from_slice(&2u16.to_le_bytes()); // channels
        wav.extend_from_slice(&48_000u32.to_le_bytes());
        wav.extend_from_slice(&(48_000u32 * 4).to_le_bytes());
        wav.extend_from_slice(&4u16.to_le_bytes());
        wav.extend_from_slice(&16u16.to_le_bytes());
        wav.extend_from_slice(b"data");
        wav.extend_from_slice(&(data.len() as u32).to_le_bytes());
        wav.extend_from_slice(&data);
        let source =
            FileSource::load(&write(&dir, "x.wav", &wav), SampleFormat::S16, 1).expect("wav");
        assert_eq!(source.channels, 2);
        let mut out = vec![0u8; data.len()];
        source.render(SampleFormat::S16, 0, &mut out);
        assert_eq!(out, data);
    }

    #[test]
    fn recordings_replay_their_payload() {
        let dir = tempfile::tempdir().expect("dir");
        let mut file = RECORDING_MAGIC.to_vec();
        for first in [0u64, 3] {
            let header = BufferHeader {
                first_frame: first.into(),
                frame_count: 3.into(),
                format: SampleFormat::S16 as u8,
                channels: 1.into(),
                ..Default::default()
            };
            file.extend_from_slice(header.as_bytes());
            for n in first..first + 3 {
                file.extend_from_slice(&(n as i16).to_le_bytes());
            }
        }
        let source = FileSource::load(&write(&dir, "x.vdaqrec", &file), SampleFormat::S16, 1)
            .expect("recording");
        assert_eq!(source.frames(), 6);
        let mut out = vec![0u8; 12];
        source.render(SampleFormat::S16, 0, &mut out);
        assert_eq!(
            vdaq_wire::pattern::verify_counter(SampleFormat::S16, 0, &out),
            None
        );
        assert!(
            FileSource::load(&write(&dir, "bad.vdaqrec", b"nope"), SampleFormat::S16, 1).is_err()
        );
    }
}
