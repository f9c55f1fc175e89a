//! Throughput over guest time, from the guest's progress lines (cumulative verified bytes at
//! guest times), with the run's overall figure as a reference line.

use std::path::Path;

use plotters::prelude::*;

use crate::{draw_legend, drawn, prepare, PlotError, FONT};

/// Cumulative verified payload at a guest time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Guest time since streaming began (ms).
    pub guest_ms: u64,
    /// Payload bytes verified by then.
    pub bytes: u64,
}

/// What a throughput chart shows.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ThroughputSummary {
    /// Intervals drawn (one per pair of consecutive progress points).
    pub intervals: usize,
    /// Highest interval rate (MB/s, 10⁶ bytes per guest second).
    pub peak_mb_s: f64,
}

const LINE: RGBColor = RGBColor(31, 90, 180);

/// Draws the rate of each interval between consecutive `points` (starting from 0 bytes at
/// 0 ms) as steps, and `overall_mb_s` as a dashed reference, into `out`.
pub fn throughput(
    points: &[Progress],
    overall_mb_s: f64,
    title: &str,
    size: (u32, u32),
    out: &Path,
) -> Result<ThroughputSummary, PlotError> {
    prepare(size)?;
    let mut steps = Vec::new();
    let mut previous = Progress {
        guest_ms: 0,
        bytes: 0,
    };
    for &point in points {
        if point.guest_ms <= previous.guest_ms || point.bytes < previous.bytes {
            continue; // not later, or not cumulative: skip rather than invent a rate
        }
        let seconds = (point.guest_ms - previous.guest_ms) as f64 / 1e3;
        let rate = (point.bytes - previous.bytes) as f64 / 1e6 / seconds;
        steps.push((
            previous.guest_ms as f64 / 1e3,
            point.guest_ms as f64 / 1e3,
            rate,
        ));
        previous = point;
    }
    if steps.is_empty() {
        return Err(PlotError::Empty(
            "no progress reported during the run".into(),
        ));
    }
    // The reported figure comes from the guest: one that is no number is not drawn.
    let overall_mb_s = if overall_mb_s.is_finite() && overall_mb_s >= 0.0 {
        overall_mb_s
    } else {
        0.0
    };
    let end = steps.last().map_or(1.0, |s| s.1);
    let peak = steps.iter().map(|s| s.2).fold(0.0, f64::max);
    let top = peak.max(overall_mb_s) * 1.15 + 1e-3;

    let root = BitMapBackend::new(out, size).into_drawing_area();
    drawn(out, root.fill(&WHITE))?;
    let mut chart = drawn(
        out,
        ChartBuilder::on(&root)
            .caption(title, (FONT, 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..end, 0.0..top),
    )?;
    drawn(
        out,
        chart
            .configure_mesh()
            .x_desc("guest time (s)")
            .y_desc("verified MB/s")
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            .light_line_style(WHITE)
            .draw(),
    )?;
    let outline: Vec<(f64, f64)> = steps
        .iter()
        .flat_map(|&(from, to, rate)| [(from, rate), (to, rate)])
        .collect();
    let mut area = outline.clone();
    area.insert(0, (0.0, 0.0));
    area.push((end, 0.0));
    drawn(
        out,
        chart.draw_series(std::iter::once(Polygon::new(area, LINE.mix(0.25).filled()))),
    )?;
    drawn(
        out,
        chart
            .draw_series(LineSeries::new(outline, LINE.stroke_width(2)))
            .map(|s| {
                s.label("per interval")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], LINE));
            }),
    )?;
    let reference = RGBColor(200, 40, 40);
    drawn(
        out,
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, overall_mb_s), (end, overall_mb_s)],
                6,
                4,
                reference.stroke_width(2),
            ))
            .map(|s| {
                s.label(format!("whole run {overall_mb_s:.1} MB/s"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], reference));
            }),
    )?;
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight, out)?;
    drawn(out, root.present())?;
    Ok(ThroughputSummary {
        intervals: steps.len(),
        peak_mb_s: peak,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::png_size;

    #[test]
    fn each_interval_is_one_step_at_its_own_rate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("throughput.png");
        let points = [
            Progress {
                guest_ms: 500,
                bytes: 50_000_000,
            },
            Progress {
                guest_ms: 1000,
                bytes: 150_000_000,
            },
            Progress {
                guest_ms: 1000, // repeated time: skipped
                bytes: 160_000_000,
            },
            Progress {
                guest_ms: 1500,
                bytes: 200_000_000,
            },
        ];
        let summary = throughput(&points, 133.3, "t", (800, 400), &out).expect("drawn");
        assert_eq!(summary.intervals, 3);
        assert!((summary.peak_mb_s - 200.0).abs() < 1e-9, "{summary:?}");
        assert_eq!(png_size(&out), (800, 400));
    }

    #[test]
    fn no_progress_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(matches!(
            throughput(&[], 1.0, "t", (800, 400), &dir.path().join("t.png")),
            Err(PlotError::Empty(_))
        ));
    }
}
