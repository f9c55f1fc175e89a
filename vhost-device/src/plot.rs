//! `vhost-device-daq plot FILE`: what a recording (or any replayable source file) holds, as
//! a PNG: the channels stacked over a frame range, decimated to min/max envelopes, with the
//! buffer boundaries, overrun gaps, trigger points and discontinuities its buffer headers
//! record. Files without headers (WAV, CSV, raw) are one run of frames from frame 0.

use std::ops::Range;
use std::path::{Path, PathBuf};

use thiserror::Error;
use vdaq_plot::waveform::{columns_for, waveform, Envelope, Mark, WaveformStyle, WaveformSummary};
use vdaq_plot::PlotError;
use vdaq_wire::buffer::{flags, BufferHeader};
use vdaq_wire::SampleFormat;

use crate::model::source::{decode, recording_buffers, FileSource, SourceError};

/// Frame numbers a recording may use (see `read_recording`).
const MAX_FRAME: u64 = 1 << 52;

/// Most channels stacked when `--channels` is not given.
const DEFAULT_MAX_CHANNELS: u16 = 16;

/// `plot`'s options.
#[derive(clap::Args, Debug, Clone)]
pub struct PlotArgs {
    /// A recording made with --record (.vdaqrec), or a .wav, .csv or raw source file.
    pub input: PathBuf,
    /// The PNG to write [default: INPUT with the extension .png].
    #[arg(short, long, value_name = "PNG")]
    pub output: Option<PathBuf>,
    /// Channels to draw, comma-separated (e.g. 0,2) [default: all, at most 16].
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub channels: Vec<u16>,
    /// Stream frames to draw: A..B, A.. or ..B [default: the whole file].
    #[arg(long, value_name = "A..B", value_parser = parse_range, conflicts_with = "trigger")]
    pub frames: Option<Range<u64>>,
    /// The recording session to draw (1 = the first) [default: the last]. A session ends
    /// where the stream starts over: a device reset, a new connection, a restarted backend
    /// appending to the same file.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub session: Option<u64>,
    /// Centre the view on the N-th trigger (1 = the first) the headers record.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub trigger: Option<u64>,
    /// Frames shown around the trigger with --trigger.
    #[arg(long, value_name = "FRAMES", default_value_t = 4000, requires = "trigger",
          value_parser = clap::value_parser!(u64).range(2..))]
    pub window: u64,
    /// Image size in pixels [default: 1200 wide, 140 per channel high].
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    pub size: Option<(u32, u32)>,
    /// Sample format of a raw file (recordings, WAV and CSV say their own).
    #[arg(long, value_enum, default_value_t = SampleFormat::S16)]
    pub format: SampleFormat,
    /// Channels per frame of a raw file.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub file_channels: u16,
    /// Print what was drawn as one JSON object on stdout (else one line on stderr).
    #[arg(long)]
    pub json: bool,
}

/// Why a plot could not be made.
#[derive(Debug, Error)]
pub enum PlotCommandError {
    /// The input could not be read or is not what it claims.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A recording that stops making sense part-way.
    #[error("{path}: {reason}")]
    Recording {
        /// File.
        path: String,
        /// Where and what.
        reason: String,
    },
    /// An option does not fit the file.
    #[error("{0}")]
    Option(String),
    /// Drawing failed.
    #[error(transparent)]
    Plot(#[from] PlotError),
}

fn parse_range(text: &str) -> Result<Range<u64>, String> {
    let (start, end) = text
        .split_once("..")
        .ok_or_else(|| format!("`{text}` is not a range; write A..B, A.. or ..B"))?;
    let number = |s: &str, default| {
        if s.is_empty() {
            Ok(default)
        } else {
            s.parse::<u64>()
                .map_err(|_| format!("`{s}` in `{text}` is not a frame number"))
        }
    };
    let range = number(start, 0)?..number(end, u64::MAX)?;
    if range.start >= range.end {
        return Err(format!(
            "`{text}` is empty; the end must be after the start"
        ));
    }
    Ok(range)
}

fn parse_size(text: &str) -> Result<(u32, u32), String> {
    let (w, h) = text
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("`{text}` is not a size; write WIDTHxHEIGHT, e.g. 1200x600"))?;
    let side = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("`{s}` in `{text}` is not a number of pixels"))
    };
    Ok((side(w)?, side(h)?))
}

/// What the file holds, as runs of frames and header marks.
struct Contents {
    channels: u16,
    rate_hz: u32,
    /// (first frame, channels, samples) per buffer or run.
    runs: Vec<(u64, u16, Vec<f64>)>,
    marks: Vec<Mark>,
    /// First frame the file accounts for (a leading overrun gap included) and the end.
    span: Range<u64>,
    buffers: usize,
    /// Sessions in the file, and the one drawn (1-based); 1 of 1 for files without headers.
    sessions: (usize, usize),
}

/// The buffers of one recording session, each header with its payload.
type Session<'a> = Vec<(BufferHeader, &'a [u8])>;

/// The buffers of `bytes` cut into sessions: a session ends where the stream starts over
/// (sequence 0 again, or a first frame before the previous buffer's end).
fn sessions(bytes: &[u8]) -> Result<Vec<Session<'_>>, String> {
    let mut sessions: Vec<Session<'_>> = Vec::new();
    let mut previous_end = 0u64;
    for buffer in recording_buffers(bytes)? {
        let (header, payload) = buffer?;
        let first = header.first_frame.get();
        let starts_over = header.sequence.get() == 0 || first < previous_end;
        match sessions.last_mut() {
            Some(session) if !starts_over => session.push((header, payload)),
            _ => sessions.push(vec![(header, payload)]),
        }
        previous_end = first.saturating_add(u64::from(header.frame_count.get()));
    }
    Ok(sessions)
}

fn read_recording(
    path: &Path,
    bytes: &[u8],
    session: Option<u64>,
) -> Result<Contents, PlotCommandError> {
    let bad = |reason: String| PlotCommandError::Recording {
        path: path.display().to_string(),
        reason,
    };
    let all = sessions(bytes).map_err(bad)?;
    let count = all.len();
    let chosen = match session {
        None => count,
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|&n| n <= count)
            .ok_or_else(|| {
                PlotCommandError::Option(format!(
                    "--session {n}: {} holds {count} session(s); pick 1..={count}",
                    path.display()
                ))
            })?,
    };
    let mut contents = Contents {
        channels: 0,
        rate_hz: 0,
        runs: Vec::new(),
        marks: Vec::new(),
        span: 0..0,
        buffers: 0,
        sessions: (count, chosen),
    };
    let (mut start, mut end) = (u64::MAX, 0);
    for (header, payload) in all
        .into_iter()
        .nth(chosen.wrapping_sub(1))
        .unwrap_or_default()
    {
        let format = SampleFormat::from_code(header.format)
            .ok_or_else(|| bad(format!("buffer {} has an unknown format", header.sequence)))?;
        let first = header.first_frame.get();
        let frames = u64::from(header.frame_count.get());
        // Frame numbers stay below 2^52, where an f64 axis still tells frames apart (and sums
        // of them cannot overflow).
        let buffer_end = first
            .checked_add(frames)
            .filter(|&end| end < MAX_FRAME)
            .ok_or_else(|| {
                bad(format!(
                    "buffer {} claims frames {first}.. past 2^52",
                    header.sequence
                ))
            })?;
        let header_flags = header.flags.get();
        contents.buffers += 1;
        contents.channels = contents.channels.max(header.channels.get());
        if contents.rate_hz == 0 {
            contents.rate_hz = header.rate_hz.get();
        }
        contents.marks.push(Mark::BufferStart(first));
        let mut starts_at = first;
        if header_flags & flags::OVERRUN != 0 {
            let dropped = header.dropped_frames.get();
            starts_at = first.saturating_sub(dropped);
            contents.marks.push(Mark::Overrun {
                first_lost: starts_at,
                dropped,
            });
        }
        if header_flags & flags::TRIGGERED != 0 {
            contents.marks.push(Mark::Trigger(
                first + u64::from(header.trigger_frame.get()).min(frames),
            ));
        }
        if header_flags & flags::DISCONTINUITY != 0 {
            contents.marks.push(Mark::Discontinuity(first));
        }
        start = start.min(starts_at);
        end = end.max(buffer_end);
        let samples = payload
            .chunks_exact(format.sample_bytes())
            .map(|s| decode(format, s))
            .collect();
        contents.runs.push((first, header.channels.get(), samples));
    }
    if contents.buffers == 0 {
        return Err(bad("the recording holds no buffer".into()));
    }
    contents.span = start..end;
    Ok(contents)
}

fn read_source(args: &PlotArgs) -> Result<Contents, PlotCommandError> {
    let source = FileSource::load(&args.input, args.format, args.file_channels)?;
    let frames = (source.samples.len() / usize::from(source.channels.max(1))) as u64;
    Ok(Contents {
        channels: source.channels,
        rate_hz: 0,
        runs: vec![(0, source.channels, source.samples)],
        marks: Vec::new(),
        span: 0..frames,
        buffers: 0,
        sessions: (1, 1),
    })
}

/// The frame range to draw.
fn view(args: &PlotArgs, contents: &Contents) -> Result<Range<u64>, PlotCommandError> {
    if let Some(n) = args.trigger {
        let triggers: Vec<u64> = contents
            .marks
            .iter()
            .filter_map(|m| match *m {
                Mark::Trigger(f) => Some(f),
                _ => None,
            })
            .collect();
        let at = usize::try_from(n - 1)
            .ok()
            .and_then(|i| triggers.get(i))
            .ok_or_else(|| {
                PlotCommandError::Option(format!(
                    "--trigger {n}: {} holds {} trigger(s); pick 1..={}",
                    args.input.display(),
                    triggers.len(),
                    triggers.len()
                ))
            })?;
        // A quarter before the trigger, as an oscilloscope shows it.
        let start = at.saturating_sub(args.window / 4);
        return Ok(start..start.saturating_add(args.window));
    }
    let span = contents.span.clone();
    let range = match &args.frames {
        Some(r) => r.start.max(span.start)..r.end.min(span.end),
        None => span.clone(),
    };
    if range.start >= range.end {
        return Err(PlotCommandError::Option(format!(
            "--frames: {} holds frames {}..{}; pick a range inside it",
            args.input.display(),
            span.start,
            span.end
        )));
    }
    Ok(range)
}

/// Draws the plot `args` asks for; what was drawn.
pub fn run(args: &PlotArgs) -> Result<(PathBuf, WaveformSummary), PlotCommandError> {
    let bytes = std::fs::read(&args.input).map_err(|source| SourceError::Read {
        path: args.input.display().to_string(),
        source,
    })?;
    // A recording by its magic, whatever its name (`--record` takes any file name).
    let contents = if bytes.starts_with(crate::model::source::RECORDING_MAGIC) {
        read_recording(&args.input, &bytes, args.session)?
    } else {
        drop(bytes);
        read_source(args)?
    };
    let channels: Vec<u16> = if args.channels.is_empty() {
        (0..contents.channels.min(DEFAULT_MAX_CHANNELS)).collect()
    } else {
        if let Some(&bad) = args.channels.iter().find(|&&c| c >= contents.channels) {
            return Err(PlotCommandError::Option(format!(
                "--channels: {} has channels 0..{}, not {bad}",
                args.input.display(),
                contents.channels
            )));
        }
        args.channels.clone()
    };
    let range = view(args, &contents)?;
    let size = args
        .size
        .unwrap_or((1200, (100 + 140 * channels.len() as u32).clamp(300, 2400)));
    let mut envelope = Envelope::new(channels.clone(), range.clone(), columns_for(size));
    for (first, run_channels, samples) in &contents.runs {
        envelope.push(*first, *run_channels, samples);
    }
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| args.input.with_extension("png"));
    let name = args
        .input
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let title = match contents.sessions {
        _ if contents.buffers == 0 => name,
        (1, _) => format!("{name}: {} buffers", contents.buffers),
        (count, chosen) => format!(
            "{name}: session {chosen} of {count} (--session N), {} buffers",
            contents.buffers
        ),
    };
    let style = WaveformStyle {
        title,
        rate_hz: contents.rate_hz,
        size,
    };
    let summary = waveform(&envelope, &contents.marks, &style, &output)?;
    Ok((output, summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::source::RECORDING_MAGIC;
    use vdaq_wire::zerocopy::IntoBytes;

    fn args(input: PathBuf) -> PlotArgs {
        PlotArgs {
            input,
            output: None,
            channels: Vec::new(),
            frames: None,
            session: None,
            trigger: None,
            window: 4000,
            size: None,
            format: SampleFormat::S16,
            file_channels: 1,
            json: false,
        }
    }

    /// A recording of 2-channel S16 buffers: (first frame, frames, flags, dropped, trigger).
    fn recording(buffers: &[(u64, u32, u16, u64, u32)]) -> Vec<u8> {
        let mut file = RECORDING_MAGIC.to_vec();
        for (sequence, &(first, frames, flag_bits, dropped, trigger)) in buffers.iter().enumerate()
        {
            let header = BufferHeader {
                sequence: (sequence as u64).into(),
                first_frame: first.into(),
                dropped_frames: dropped.into(),
                frame_count: frames.into(),
                trigger_frame: trigger.into(),
                flags: flag_bits.into(),
                format: SampleFormat::S16 as u8,
                channels: 2.into(),
                rate_hz: 48_000.into(),
                ..Default::default()
            };
            file.extend_from_slice(header.as_bytes());
            for frame in first..first + u64::from(frames) {
                file.extend_from_slice(&((frame % 1000) as i16 * 20).to_le_bytes());
                file.extend_from_slice(&(-((frame % 500) as i16) * 30).to_le_bytes());
            }
        }
        file
    }

    #[test]
    fn a_recordings_marks_come_from_its_headers() {
        let dir = tempfile::tempdir().expect("temp dir");
        let input = dir.path().join("run.vdaqrec");
        std::fs::write(
            &input,
            recording(&[
                (0, 1000, 0, 0, 0),
                (1000, 1000, flags::TRIGGERED, 0, 250),
                (2600, 1000, flags::OVERRUN, 600, 0),
                (3600, 1000, flags::DISCONTINUITY, 0, 0),
            ]),
        )
        .expect("written");
        let (output, summary) = run(&args(input)).expect("plotted");
        assert_eq!(output, dir.path().join("run.png"));
        assert_eq!(summary.frames, 0..4600);
        assert_eq!(summary.channels, vec![0, 1]);
        assert_eq!(summary.samples, 2 * 4000);
        assert_eq!(summary.buffer_boundaries, 3);
        assert_eq!((summary.overruns, summary.dropped_frames), (1, 600));
        assert_eq!(summary.triggers, 1);
        assert_eq!(summary.discontinuities, 1);
        assert!(std::fs::metadata(&output).expect("png").len() > 1000);
    }

    #[test]
    fn trigger_view_centres_on_the_chosen_trigger_and_bad_choices_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let input = dir.path().join("t.vdaqrec");
        std::fs::write(&input, recording(&[(0, 8000, flags::TRIGGERED, 0, 5000)]))
            .expect("written");
        let mut a = args(input);
        a.trigger = Some(1);
        a.window = 2000;
        let (_, summary) = run(&a).expect("plotted");
        assert_eq!(summary.frames, 4500..6500);
        assert_eq!(summary.triggers, 1);
        a.trigger = Some(2);
        let err = run(&a).expect_err("only one trigger").to_string();
        assert!(err.contains("holds 1 trigger(s)"), "{err}");
        a.trigger = None;
        a.channels = vec![2];
        let err = run(&a).expect_err("no channel 2").to_string();
        assert!(err.contains("has channels 0..2, not 2"), "{err}");
    }

    #[test]
    fn a_recording_that_starts_over_is_drawn_one_session_at_a_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let input = dir.path().join("two.vdaqrec");
        // Two sessions: a reconnect appends a stream that starts again at sequence 0, frame 0.
        let mut bytes = recording(&[(0, 1000, 0, 0, 0), (1000, 1000, flags::TRIGGERED, 0, 10)]);
        bytes.extend_from_slice(
            &recording(&[(0, 500, 0, 0, 0)])[crate::model::source::RECORDING_MAGIC.len()..],
        );
        std::fs::write(&input, bytes).expect("written");
        let (_, last) = run(&args(input.clone())).expect("plotted");
        assert_eq!(last.frames, 0..500, "the last session by default");
        assert_eq!((last.samples, last.triggers), (2 * 500, 0));
        let mut first = args(input.clone());
        first.session = Some(1);
        let (_, first) = run(&first).expect("plotted");
        assert_eq!(first.frames, 0..2000);
        assert_eq!((first.samples, first.triggers), (2 * 2000, 1));
        let mut third = args(input);
        third.session = Some(3);
        let err = run(&third).expect_err("two sessions").to_string();
        assert!(err.contains("holds 2 session(s)"), "{err}");
    }

    #[test]
    fn frame_numbers_that_would_overflow_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let input = dir.path().join("huge.vdaqrec");
        let mut bytes = recording(&[(0, 4, 0, 0, 0)]);
        // first_frame (bytes 8..16 of the header, after the magic) near u64::MAX.
        bytes[8 + 8..8 + 16].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        std::fs::write(&input, bytes).expect("written");
        let err = run(&args(input)).expect_err("refused").to_string();
        assert!(err.contains("past 2^52"), "{err}");
    }

    #[test]
    fn a_truncated_recording_is_refused_with_the_offset() {
        let dir = tempfile::tempdir().expect("temp dir");
        let input = dir.path().join("cut.vdaqrec");
        let mut bytes = recording(&[(0, 100, 0, 0, 0)]);
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&input, bytes).expect("written");
        let err = run(&args(input)).expect_err("truncated").to_string();
        assert!(err.contains("truncated payload at byte 8"), "{err}");
    }

    #[test]
    fn a_csv_source_is_one_run_from_frame_zero() {
        let dir = tempfile::tempdir().expect("temp dir");
        let input = dir.path().join("wave.csv");
        let lines: String = (0..500)
            .map(|i| format!("{},{}\n", (f64::from(i) / 40.0).sin() * 0.5, 0.25))
            .collect();
        std::fs::write(&input, lines).expect("written");
        let mut a = args(input);
        a.output = Some(dir.path().join("out.png"));
        a.frames = Some(100..300);
        let (output, summary) = run(&a).expect("plotted");
        assert_eq!(output, dir.path().join("out.png"));
        assert_eq!(summary.frames, 100..300);
        assert_eq!(summary.samples, 2 * 200);
        assert_eq!(summary.overruns + summary.triggers, 0);
    }

    #[test]
    fn ranges_and_sizes_parse_or_say_how_to_write_them() {
        assert_eq!(parse_range("10..20"), Ok(10..20));
        assert_eq!(parse_range("10.."), Ok(10..u64::MAX));
        assert_eq!(parse_range("..20"), Ok(0..20));
        assert!(parse_range("20..10")
            .expect_err("empty")
            .contains("after the start"));
        assert!(parse_range("20").expect_err("no dots").contains("A..B"));
        assert_eq!(parse_size("800x600"), Ok((800, 600)));
        assert!(parse_size("800")
            .expect_err("no x")
            .contains("WIDTHxHEIGHT"));
    }
}
