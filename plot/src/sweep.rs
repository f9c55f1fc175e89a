//! A benchmark sweep as grouped bars: one group per shape (reads in flight × buffer size), one
//! bar per series (guest and accelerator), each with its baseline drawn as a tick over it.

use std::path::Path;

use plotters::prelude::*;

use crate::{draw_legend, drawn, prepare, PlotError, FONT};

/// One measured figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    /// The group (shape), e.g. "64 × 64 KiB".
    pub group: String,
    /// The series, e.g. "bare-metal tcg".
    pub series: String,
    /// Verified MB/s.
    pub value: f64,
    /// The same run's consume-only rate (MB/s), drawn as a tick; 0 if none.
    pub baseline: f64,
}

/// What a sweep chart shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SweepSummary {
    /// Bars drawn.
    pub bars: usize,
    /// Groups on the x axis.
    pub groups: usize,
}

fn colour(series: usize) -> RGBColor {
    const COLOURS: [RGBColor; 4] = [
        RGBColor(31, 90, 180),
        RGBColor(230, 120, 0),
        RGBColor(20, 130, 130),
        RGBColor(120, 60, 160),
    ];
    COLOURS[series % COLOURS.len()]
}

/// Draws `bars` into `out`; groups and series keep their first-seen order.
pub fn sweep(
    bars: &[Bar],
    title: &str,
    size: (u32, u32),
    out: &Path,
) -> Result<SweepSummary, PlotError> {
    prepare(size)?;
    let mut groups: Vec<&str> = Vec::new();
    let mut series: Vec<&str> = Vec::new();
    for bar in bars {
        if !groups.contains(&bar.group.as_str()) {
            groups.push(&bar.group);
        }
        if !series.contains(&bar.series.as_str()) {
            series.push(&bar.series);
        }
    }
    if bars.is_empty() {
        return Err(PlotError::Empty("no benchmark figures".into()));
    }
    let top = bars
        .iter()
        .map(|b| b.value.max(b.baseline))
        .fold(0.0, f64::max)
        * 1.15
        + 1e-3;
    let root = BitMapBackend::new(out, size).into_drawing_area();
    drawn(out, root.fill(&WHITE))?;
    let group_names: Vec<String> = groups.iter().map(|g| (*g).to_string()).collect();
    let mut chart = drawn(
        out,
        ChartBuilder::on(&root)
            .caption(title, (FONT, 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..groups.len() as f64, 0.0..top),
    )?;
    drawn(
        out,
        chart
            .configure_mesh()
            .x_labels(groups.len() * 2 + 1)
            .x_label_formatter(&|x| {
                // Labels at group centres only.
                let centre = x - x.floor();
                if (centre - 0.5).abs() < 1e-6 {
                    group_names
                        .get(x.floor() as usize)
                        .cloned()
                        .unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .disable_x_mesh()
            .y_desc("verified MB/s (tick: consume-only rate)")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            .light_line_style(WHITE)
            .draw(),
    )?;
    let width = 0.8 / series.len() as f64;
    let place = |bar: &Bar| {
        let g = groups.iter().position(|g| *g == bar.group).unwrap_or(0) as f64;
        let s = series.iter().position(|s| *s == bar.series).unwrap_or(0);
        let left = g + 0.1 + s as f64 * width;
        (left, left + width * 0.9, s)
    };
    for (index, name) in series.iter().enumerate() {
        let c = colour(index);
        drawn(
            out,
            chart
                .draw_series(bars.iter().filter(|b| b.series == *name).map(|bar| {
                    let (left, right, _) = place(bar);
                    Rectangle::new([(left, 0.0), (right, bar.value)], c.filled())
                }))
                .map(|s| {
                    s.label(*name).legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled())
                    });
                }),
        )?;
    }
    drawn(
        out,
        chart.draw_series(bars.iter().filter(|b| b.baseline > 0.0).map(|bar| {
            let (left, right, _) = place(bar);
            PathElement::new(
                vec![(left, bar.baseline), (right, bar.baseline)],
                BLACK.stroke_width(2),
            )
        })),
    )?;
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft, out)?;
    drawn(out, root.present())?;
    Ok(SweepSummary {
        bars: bars.len(),
        groups: groups.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{pixels_of, png_size};

    #[test]
    fn every_figure_is_a_bar_in_its_group() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("sweep.png");
        let bar = |group: &str, series: &str, value| Bar {
            group: group.into(),
            series: series.into(),
            value,
            baseline: value * 1.5,
        };
        let bars = [
            bar("8 × 4 KiB", "bare-metal tcg", 400.0),
            bar("8 × 4 KiB", "linux tcg", 200.0),
            bar("64 × 64 KiB", "bare-metal tcg", 1400.0),
            bar("64 × 64 KiB", "linux tcg", 700.0),
        ];
        let summary = sweep(&bars, "sweep", (900, 450), &out).expect("drawn");
        assert_eq!(summary, SweepSummary { bars: 4, groups: 2 });
        assert_eq!(png_size(&out), (900, 450));
        assert!(pixels_of(&out, [230, 120, 0]) > 500, "second series drawn");
    }
}
