//! The latency histogram: device timestamp of a buffer's first frame to its consumption,
//! bucketed as the guest reports it (`vdaq_wire::latency`), on a logarithmic axis, with the
//! median and 99th percentile marked.

use std::path::Path;

use plotters::prelude::*;

use crate::{draw_legend, drawn, prepare, PlotError, FONT};

/// One histogram bucket: `count` buffers with latencies in `[low_us, high_us)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Lower edge (µs, inclusive).
    pub low_us: u64,
    /// Upper edge (µs, exclusive).
    pub high_us: u64,
    /// Buffers in the bucket.
    pub count: u64,
}

/// What a latency chart shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HistogramSummary {
    /// Buffers counted over all buckets.
    pub buffers: u64,
    /// Non-empty buckets drawn.
    pub buckets: usize,
}

/// Bar colour.
const BAR: RGBColor = RGBColor(31, 90, 180);

/// Draws the histogram of `buckets` with vertical lines at `p50_us` and `p99_us` into `out`.
pub fn latency_histogram(
    buckets: &[Bucket],
    p50_us: u64,
    p99_us: u64,
    title: &str,
    size: (u32, u32),
    out: &Path,
) -> Result<HistogramSummary, PlotError> {
    prepare(size)?;
    let drawn_buckets: Vec<Bucket> = buckets
        .iter()
        .copied()
        .filter(|b| b.count > 0 && b.high_us > b.low_us)
        .collect();
    if drawn_buckets.is_empty() {
        return Err(PlotError::Empty("no latencies reported".into()));
    }
    // A log axis cannot start at 0: the [0, 1) µs bucket is drawn from 0.5 µs.
    let edge = |us: u64| (us as f64).max(0.5);
    let low = drawn_buckets
        .iter()
        .map(|b| edge(b.low_us))
        .fold(f64::MAX, f64::min);
    let high = drawn_buckets
        .iter()
        .map(|b| edge(b.high_us))
        .fold(0.0, f64::max)
        .max(edge(p99_us) * 1.1);
    // Counts come from the guest: saturating, so an absurd one cannot overflow.
    let tallest = drawn_buckets.iter().map(|b| b.count).max().unwrap_or(1);
    let top = tallest.saturating_add(tallest / 10).saturating_add(1);
    let buffers = drawn_buckets
        .iter()
        .fold(0u64, |sum, b| sum.saturating_add(b.count));

    let root = BitMapBackend::new(out, size).into_drawing_area();
    drawn(out, root.fill(&WHITE))?;
    let mut chart = drawn(
        out,
        ChartBuilder::on(&root)
            .caption(title, (FONT, 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((low / 1.2..high * 1.2).log_scale(), 0u64..top),
    )?;
    drawn(
        out,
        chart
            .configure_mesh()
            .x_desc("latency, device timestamp to consumption (µs, log scale)")
            .y_desc("buffers")
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .light_line_style(WHITE)
            .draw(),
    )?;
    drawn(
        out,
        chart.draw_series(drawn_buckets.iter().map(|b| {
            Rectangle::new(
                [(edge(b.low_us), 0), (edge(b.high_us), b.count)],
                BAR.mix(0.8).filled(),
            )
        })),
    )?;
    for (us, name, colour) in [
        (p50_us, "p50", RGBColor(0, 150, 0)),
        (p99_us, "p99", RGBColor(200, 40, 40)),
    ] {
        let x = edge(us);
        drawn(
            out,
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x, 0), (x, top - 1)],
                    colour.stroke_width(2),
                )))
                .map(|series| {
                    series
                        .label(format!("{name} {us} µs"))
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                        });
                }),
        )?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight, out)?;
    drawn(out, root.present())?;
    Ok(HistogramSummary {
        buffers,
        buckets: drawn_buckets.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{pixels_of, png_size};

    #[test]
    fn histogram_counts_every_buffer_and_writes_a_png_of_the_size_asked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("latency.png");
        let buckets = [
            Bucket {
                low_us: 0,
                high_us: 1,
                count: 3,
            },
            Bucket {
                low_us: 100,
                high_us: 112,
                count: 40,
            },
            Bucket {
                low_us: 112,
                high_us: 128,
                count: 55,
            },
            Bucket {
                low_us: 4096,
                high_us: 5120,
                count: 2,
            },
            Bucket {
                low_us: 6000,
                high_us: 7000,
                count: 0,
            },
        ];
        let summary =
            latency_histogram(&buckets, 112, 4096, "latency", (640, 400), &out).expect("drawn");
        assert_eq!(summary.buffers, 100);
        assert_eq!(summary.buckets, 4, "the empty bucket is not drawn");
        assert_eq!(png_size(&out), (640, 400));
        assert!(pixels_of(&out, [0, 150, 0]) > 50, "p50 line drawn");
    }

    #[test]
    fn absurd_counts_from_a_guest_saturate_instead_of_overflowing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("latency.png");
        let bucket = |low_us, count| Bucket {
            low_us,
            high_us: low_us + 2,
            count,
        };
        let summary = latency_histogram(
            &[bucket(10, u64::MAX), bucket(20, u64::MAX)],
            10,
            20,
            "",
            (640, 400),
            &out,
        )
        .expect("drawn");
        assert_eq!(summary.buffers, u64::MAX);
    }

    #[test]
    fn no_buckets_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("latency.png");
        assert!(matches!(
            latency_histogram(&[], 0, 0, "", (640, 400), &out),
            Err(PlotError::Empty(_))
        ));
    }
}
