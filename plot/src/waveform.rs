//! Waveforms: the selected channels stacked, one panel each, over a frame range.
//!
//! Samples are decimated into one min/max pair per pixel column ([`Envelope`]), so a peak
//! between two columns is never skipped (keeping every n-th sample would drop it), and the
//! envelope is drawn as a band between its two edges. Frames the card never delivered leave
//! the band broken. Marks come from the buffer headers: buffer boundaries (grey), overrun gaps
//! (red band over the frames lost), trigger points (green) and discontinuities (orange).

use std::fmt;
use std::ops::Range;
use std::path::Path;

use plotters::prelude::*;

use crate::{drawn, prepare, PlotError, FONT};

/// Something a buffer header says about the stream, at a stream frame index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// A buffer begins at this frame.
    BufferStart(u64),
    /// `dropped` frames were lost to overrun, starting at `first_lost`.
    Overrun {
        /// First frame lost.
        first_lost: u64,
        /// Frames lost.
        dropped: u64,
    },
    /// A trigger fired at this frame.
    Trigger(u64),
    /// The stream's format or signal changed at this frame.
    Discontinuity(u64),
}

/// Left margin of each panel (the y labels); the plot's pixel columns are what remains.
const Y_LABEL_AREA: u32 = 64;
/// Outer margin of each panel.
const MARGIN: u32 = 8;
/// Height of the caption and legend strip.
const HEADER: u32 = 44;
/// Height of the x-axis labels under the bottom panel.
const X_LABEL_AREA: u32 = 36;

/// Pixel columns a waveform of `size` has for data: one envelope column each.
pub fn columns_for(size: (u32, u32)) -> usize {
    // Panels have no left margin (the y labels are there) and `MARGIN` on the right.
    size.0.saturating_sub(Y_LABEL_AREA + MARGIN).max(1) as usize
}

/// Min/max of each selected channel per column over a frame range.
#[derive(Clone, Debug)]
pub struct Envelope {
    selected: Vec<u16>,
    frames: Range<u64>,
    columns: usize,
    /// `columns × selected` (column-major): min, max.
    min: Vec<f64>,
    max: Vec<f64>,
    filled: Vec<bool>,
    samples: u64,
}

impl Envelope {
    /// An empty envelope of `selected` channels (indices into the card's frames) over
    /// `frames`, at most `columns` wide (fewer when the range has fewer frames).
    pub fn new(selected: Vec<u16>, frames: Range<u64>, columns: usize) -> Self {
        let span = frames.end.saturating_sub(frames.start);
        let columns = usize::try_from(span)
            .unwrap_or(usize::MAX)
            .min(columns)
            .max(1);
        let cells = columns * selected.len();
        Envelope {
            selected,
            frames,
            columns,
            min: vec![f64::INFINITY; cells],
            max: vec![f64::NEG_INFINITY; cells],
            filled: vec![false; columns],
            samples: 0,
        }
    }

    /// The frame range.
    pub fn frames(&self) -> Range<u64> {
        self.frames.clone()
    }

    fn column(&self, frame: u64) -> Option<usize> {
        if !self.frames.contains(&frame) {
            return None;
        }
        let span = u128::from(self.frames.end - self.frames.start);
        let offset = u128::from(frame - self.frames.start);
        usize::try_from(offset * self.columns as u128 / span).ok()
    }

    /// Adds consecutive frames starting at stream frame `first_frame`: `interleaved` holds
    /// whole frames of `channels` samples (a trailing partial frame is ignored). Frames
    /// outside the range, and selected channels a frame does not have, are skipped.
    pub fn push(&mut self, first_frame: u64, channels: u16, interleaved: &[f64]) {
        let channels = usize::from(channels.max(1));
        for (i, frame) in interleaved.chunks_exact(channels).enumerate() {
            let Some(column) = self.column(first_frame.saturating_add(i as u64)) else {
                continue;
            };
            self.filled[column] = true;
            for (k, &channel) in self.selected.iter().enumerate() {
                let Some(&value) = frame.get(usize::from(channel)) else {
                    continue;
                };
                let cell = column * self.selected.len() + k;
                self.min[cell] = self.min[cell].min(value);
                self.max[cell] = self.max[cell].max(value);
                self.samples += 1;
            }
        }
    }

    /// Centre frame of a column, as the x coordinate.
    fn x(&self, column: usize) -> f64 {
        let span = (self.frames.end - self.frames.start) as f64;
        self.frames.start as f64 + (column as f64 + 0.5) * span / self.columns as f64
    }

    /// The y range of selected channel `k`, with a margin.
    fn y_range(&self, k: usize) -> Range<f64> {
        let cells = (0..self.columns).map(|c| c * self.selected.len() + k);
        let (lo, hi) = cells
            .filter(|&cell| self.min[cell].is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), cell| {
                (lo.min(self.min[cell]), hi.max(self.max[cell]))
            });
        if !lo.is_finite() {
            return -1.0..1.0;
        }
        let margin = ((hi - lo) * 0.08).max(0.02);
        (lo - margin)..(hi + margin)
    }

    /// Runs of consecutive filled columns.
    fn runs(&self) -> Vec<Range<usize>> {
        let mut runs = Vec::new();
        let mut start = None;
        for (column, &filled) in self.filled.iter().chain([&false]).enumerate() {
            match (filled, start) {
                (true, None) => start = Some(column),
                (false, Some(s)) => {
                    runs.push(s..column);
                    start = None;
                }
                _ => {}
            }
        }
        runs
    }
}

/// Title, sample rate and size of a waveform chart.
#[derive(Clone, Debug)]
pub struct WaveformStyle {
    /// Caption (e.g. the file name).
    pub title: String,
    /// Sample rate of the stream (Hz), for the axis label; 0 if unknown or free-running.
    pub rate_hz: u32,
    /// Width × height in pixels.
    pub size: (u32, u32),
}

/// What a waveform chart shows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WaveformSummary {
    /// Channels drawn, in panel order.
    pub channels: Vec<u16>,
    /// Frame range on the x axis.
    pub frames: Range<u64>,
    /// Samples that went into the envelope.
    pub samples: u64,
    /// Envelope columns (one per pixel column, or per frame when zoomed in further).
    pub columns: usize,
    /// Buffers that begin inside the range.
    pub buffer_boundaries: usize,
    /// Whether they are drawn (not when denser than one per three columns).
    pub buffer_boundaries_marked: bool,
    /// Overrun gaps marked.
    pub overruns: usize,
    /// Frames those gaps lost.
    pub dropped_frames: u64,
    /// Trigger points marked.
    pub triggers: usize,
    /// Discontinuities marked.
    pub discontinuities: usize,
}

impl fmt::Display for WaveformSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} channel(s), frames {}..{}, {} samples in {} columns, {} buffer boundaries{}, \
             {} overrun(s) ({} frames dropped), {} trigger(s), {} discontinuity(ies)",
            self.channels.len(),
            self.frames.start,
            self.frames.end,
            self.samples,
            self.columns,
            self.buffer_boundaries,
            if self.buffer_boundaries_marked || self.buffer_boundaries == 0 {
                ""
            } else {
                " (too dense to mark)"
            },
            self.overruns,
            self.dropped_frames,
            self.triggers,
            self.discontinuities
        )
    }
}

/// Colour of channel panel `k`.
fn channel_colour(k: usize) -> RGBColor {
    const COLOURS: [RGBColor; 4] = [
        RGBColor(31, 90, 180),
        RGBColor(120, 60, 160),
        RGBColor(20, 130, 130),
        RGBColor(90, 90, 90),
    ];
    COLOURS[k % COLOURS.len()]
}

/// Overrun gap fill (exact colour, so tests can find it in the image).
pub const OVERRUN_COLOUR: RGBColor = RGBColor(255, 170, 170);
/// Trigger line colour.
pub const TRIGGER_COLOUR: RGBColor = RGBColor(0, 160, 0);
/// Discontinuity line colour.
pub const DISCONTINUITY_COLOUR: RGBColor = RGBColor(230, 120, 0);
/// Buffer boundary colour.
pub const BOUNDARY_COLOUR: RGBColor = RGBColor(200, 200, 200);

/// Draws `envelope` with `marks` into the PNG `out`.
pub fn waveform(
    envelope: &Envelope,
    marks: &[Mark],
    style: &WaveformStyle,
    out: &Path,
) -> Result<WaveformSummary, PlotError> {
    prepare(style.size)?;
    if envelope.samples == 0 || envelope.selected.is_empty() {
        return Err(PlotError::Empty(format!(
            "no samples of the chosen channels in frames {}..{}",
            envelope.frames.start, envelope.frames.end
        )));
    }
    let range = envelope.frames();
    let in_range = |frame: u64| range.start < frame && frame < range.end;
    let boundaries: Vec<u64> = marks
        .iter()
        .filter_map(|m| match *m {
            Mark::BufferStart(f) if in_range(f) => Some(f),
            _ => None,
        })
        .collect();
    let overruns: Vec<(u64, u64)> = marks
        .iter()
        .filter_map(|m| match *m {
            // A gap is marked when it overlaps the range (its end is the next delivered frame).
            Mark::Overrun {
                first_lost,
                dropped,
            } if first_lost < range.end && first_lost + dropped >= range.start => {
                Some((first_lost, dropped))
            }
            _ => None,
        })
        .collect();
    let lines = |want: fn(&Mark) -> Option<u64>| -> Vec<u64> {
        marks
            .iter()
            .filter_map(want)
            .filter(|&f| range.contains(&f))
            .collect()
    };
    let triggers = lines(|m| match *m {
        Mark::Trigger(f) => Some(f),
        _ => None,
    });
    let discontinuities = lines(|m| match *m {
        Mark::Discontinuity(f) => Some(f),
        _ => None,
    });
    let mark_boundaries = boundaries.len() * 3 <= envelope.columns;

    let root = BitMapBackend::new(out, style.size).into_drawing_area();
    drawn(out, root.fill(&WHITE))?;
    let (header, body) = root.split_vertically(HEADER);
    drawn(
        out,
        header.draw(&Text::new(
            style.title.clone(),
            (MARGIN as i32, 4),
            (FONT, 18).into_font(),
        )),
    )?;
    let legend = format!(
        "red band: frames lost to overrun · green: trigger · orange: discontinuity{}",
        if mark_boundaries && !boundaries.is_empty() {
            " · grey: buffer boundary"
        } else {
            ""
        }
    );
    drawn(
        out,
        header.draw(&Text::new(
            legend,
            (MARGIN as i32, 24),
            (FONT, 13).into_font().color(&RGBColor(80, 80, 80)),
        )),
    )?;
    let (_, body_height) = body.dim_in_pixel();
    let panels_height = body_height.saturating_sub(X_LABEL_AREA);
    let (panels, _) = body.split_vertically(panels_height);
    let panels = panels.split_evenly((envelope.selected.len(), 1));
    let runs = envelope.runs();
    let x_range = range.start as f64..range.end as f64;
    for (k, panel) in panels.iter().enumerate() {
        let last = k + 1 == envelope.selected.len();
        let area = if last {
            // The bottom panel also carries the x labels: give it the strip reserved for them.
            let (w, h) = panel.dim_in_pixel();
            let (x0, y0) = panel.get_base_pixel();
            root.clone().shrink((x0, y0), (w, h + X_LABEL_AREA))
        } else {
            panel.clone()
        };
        let mut chart = drawn(
            out,
            ChartBuilder::on(&area)
                .margin(MARGIN)
                .margin_left(0)
                .y_label_area_size(Y_LABEL_AREA)
                .x_label_area_size(if last { X_LABEL_AREA - MARGIN } else { 0 })
                .build_cartesian_2d(x_range.clone(), envelope.y_range(k)),
        )?;
        let x_desc = if style.rate_hz > 0 {
            format!("frame (at {} Hz)", style.rate_hz)
        } else {
            "frame".to_string()
        };
        drawn(
            out,
            chart
                .configure_mesh()
                .y_desc(format!("ch {}", envelope.selected[k]))
                .x_desc(x_desc)
                .x_labels(if last { 8 } else { 0 })
                .y_labels(4)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.2}"))
                .label_style((FONT, 12))
                .axis_desc_style((FONT, 13))
                .light_line_style(WHITE)
                .draw(),
        )?;
        let y = envelope.y_range(k);
        let vertical = |x: u64, colour: RGBColor, width: u32| {
            PathElement::new(
                vec![(x as f64, y.start), (x as f64, y.end)],
                colour.stroke_width(width),
            )
        };
        if mark_boundaries {
            drawn(
                out,
                chart.draw_series(boundaries.iter().map(|&f| vertical(f, BOUNDARY_COLOUR, 1))),
            )?;
        }
        drawn(
            out,
            chart.draw_series(overruns.iter().map(|&(first, dropped)| {
                let start = first.max(range.start) as f64;
                // At least one pixel wide, so a short gap stays visible.
                let min_width = (range.end - range.start) as f64 / envelope.columns as f64;
                let end = ((first + dropped).min(range.end) as f64).max(start + min_width);
                Rectangle::new([(start, y.start), (end, y.end)], OVERRUN_COLOUR.filled())
            })),
        )?;
        let colour = channel_colour(k);
        let cell = |column: usize| column * envelope.selected.len() + k;
        // Dense (several frames a column): each column a filled bar from its min to its max,
        // edge to edge, so no pixel column is left out; the edges are joined by lines so a flat
        // stretch still shows. Zoomed in (a frame a column): the samples joined by a line.
        let dense = range.end - range.start >= 2 * envelope.columns as u64;
        let span = (range.end - range.start) as f64;
        let column_edge = |c: usize| range.start as f64 + c as f64 * span / envelope.columns as f64;
        for run in &runs {
            if dense {
                drawn(
                    out,
                    chart.draw_series(run.clone().map(|c| {
                        Rectangle::new(
                            [
                                (column_edge(c), envelope.min[cell(c)]),
                                (column_edge(c + 1), envelope.max[cell(c)]),
                            ],
                            colour.filled(),
                        )
                    })),
                )?;
            }
            for edge in [&envelope.max, &envelope.min] {
                drawn(
                    out,
                    chart.draw_series(LineSeries::new(
                        run.clone().map(|c| (envelope.x(c), edge[cell(c)])),
                        colour,
                    )),
                )?;
            }
        }
        drawn(
            out,
            chart.draw_series(
                discontinuities
                    .iter()
                    .map(|&f| vertical(f, DISCONTINUITY_COLOUR, 2)),
            ),
        )?;
        drawn(
            out,
            chart.draw_series(triggers.iter().map(|&f| vertical(f, TRIGGER_COLOUR, 2))),
        )?;
    }
    drawn(out, root.present())?;
    Ok(WaveformSummary {
        channels: envelope.selected.clone(),
        frames: range.clone(),
        samples: envelope.samples,
        columns: envelope.columns,
        buffer_boundaries: boundaries.len(),
        buffer_boundaries_marked: mark_boundaries,
        overruns: overruns.len(),
        dropped_frames: overruns.iter().map(|&(_, d)| d).sum(),
        triggers: triggers.len(),
        discontinuities: discontinuities.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{pixels_of, png_size};

    /// A sine on channel 0 and a ramp on channel 1 over `frames`.
    fn two_channels(frames: Range<u64>) -> Vec<f64> {
        frames
            .flat_map(|f| {
                let t = f as f64;
                [(t / 50.0).sin() * 0.8, (t % 1000.0) / 1000.0]
            })
            .collect()
    }

    #[test]
    fn envelope_keeps_every_peak_of_a_decimated_column() {
        let mut envelope = Envelope::new(vec![0], 0..1000, 10);
        let mut samples = vec![0.0; 1000];
        samples[437] = 0.9; // one sample high, one low, in column 4
        samples[438] = -0.7;
        envelope.push(0, 1, &samples);
        assert_eq!(envelope.columns, 10);
        assert_eq!(envelope.max[4], 0.9);
        assert_eq!(envelope.min[4], -0.7);
        assert_eq!(envelope.max[3], 0.0);
        assert_eq!(envelope.samples, 1000);
    }

    #[test]
    fn envelope_has_one_column_per_frame_when_zoomed_in_and_skips_frames_outside() {
        let mut envelope = Envelope::new(vec![1], 100..110, 500);
        envelope.push(95, 2, &two_channels(95..120));
        assert_eq!(envelope.columns, 10);
        assert_eq!(envelope.samples, 10, "only frames 100..110, channel 1 only");
        assert!(envelope.filled.iter().all(|&f| f));
    }

    #[test]
    fn frames_never_delivered_break_the_band() {
        let mut envelope = Envelope::new(vec![0], 0..1000, 100);
        envelope.push(0, 1, &[0.5; 300]);
        envelope.push(600, 1, &[0.5; 400]);
        assert_eq!(envelope.runs(), vec![0..30, 60..100]);
    }

    #[test]
    fn waveform_marks_what_the_headers_say_inside_the_range() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("wave.png");
        let mut envelope = Envelope::new(vec![0, 1], 0..20_000, columns_for((900, 500)));
        envelope.push(0, 2, &two_channels(0..8_000));
        envelope.push(10_000, 2, &two_channels(10_000..20_000));
        let marks = [
            Mark::BufferStart(0),
            Mark::BufferStart(4_000),
            Mark::BufferStart(10_000),
            Mark::Overrun {
                first_lost: 8_000,
                dropped: 2_000,
            },
            Mark::Trigger(12_345),
            Mark::Trigger(50_000), // outside the range
            Mark::Discontinuity(15_000),
        ];
        let style = WaveformStyle {
            title: "test".into(),
            rate_hz: 48_000,
            size: (900, 500),
        };
        let summary = waveform(&envelope, &marks, &style, &out).expect("drawn");
        assert_eq!(png_size(&out), (900, 500));
        assert_eq!(summary.overruns, 1);
        assert_eq!(summary.dropped_frames, 2_000);
        assert_eq!(summary.triggers, 1);
        assert_eq!(summary.discontinuities, 1);
        assert_eq!(summary.buffer_boundaries, 2, "frame 0 is the range's edge");
        assert!(summary.buffer_boundaries_marked);
        assert_eq!(summary.samples, 2 * 18_000);
        // The gap and the trigger are really in the picture.
        assert!(
            pixels_of(&out, [255, 170, 170]) > 1_000,
            "overrun band drawn"
        );
        assert!(pixels_of(&out, [0, 160, 0]) > 100, "trigger line drawn");
    }

    #[test]
    fn no_samples_in_range_is_an_error_not_an_empty_picture() {
        let envelope = Envelope::new(vec![0], 0..100, 50);
        let style = WaveformStyle {
            title: String::new(),
            rate_hz: 0,
            size: (400, 300),
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("empty.png");
        assert!(matches!(
            waveform(&envelope, &[], &style, &out),
            Err(PlotError::Empty(_))
        ));
        assert!(!out.exists());
    }

    #[test]
    fn unusable_sizes_are_refused() {
        let envelope = Envelope::new(vec![0], 0..100, 50);
        let style = WaveformStyle {
            title: String::new(),
            rate_hz: 0,
            size: (10, 10),
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("tiny.png");
        assert!(matches!(
            waveform(&envelope, &[], &style, &out),
            Err(PlotError::Size(10, 10))
        ));
    }
}
