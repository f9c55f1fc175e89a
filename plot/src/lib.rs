//! PNG charts of what the vdaq card delivered, drawn with plotters' bitmap backend and an
//! embedded DejaVu font (nothing from the system: no fontconfig, no C libraries).
//!
//! - [`waveform`]: channels stacked over a frame range, decimated to min/max envelopes, with
//!   buffer boundaries, overrun gaps, trigger points and discontinuities marked;
//! - [`latency`]: the histogram of device-timestamp-to-consumption latencies;
//! - [`throughput`]: verified throughput over guest time;
//! - [`sweep`]: a benchmark sweep as grouped bars.
//!
//! Each chart returns a summary of what it drew (marks, bars, samples), so callers can print it
//! and tests can hold it against the run the data came from.

pub mod latency;
pub mod sweep;
pub mod throughput;
pub mod waveform;

use std::path::Path;
use std::sync::Once;

use thiserror::Error;

/// A chart could not be drawn or written.
#[derive(Debug, Error)]
pub enum PlotError {
    /// Nothing to draw (no frames in range, no buckets, no points).
    #[error("nothing to plot: {0}")]
    Empty(String),
    /// The requested size is unusable.
    #[error("a chart must be at least {MIN_WIDTH}×{MIN_HEIGHT} pixels and at most {MAX_SIDE} on a side, not {0}×{1}")]
    Size(u32, u32),
    /// Drawing or encoding the PNG failed (includes the file not being writable).
    #[error("cannot draw {path}: {reason}")]
    Draw {
        /// Output file.
        path: String,
        /// What plotters reported.
        reason: String,
    },
}

/// Smallest chart side that leaves room for axes and labels.
pub const MIN_WIDTH: u32 = 320;
/// Smallest chart height.
pub const MIN_HEIGHT: u32 = 200;
/// Largest chart side (a 16k × 16k RGB bitmap is already 768 MiB).
pub const MAX_SIDE: u32 = 8192;

/// The font family every chart uses, registered once from the embedded DejaVu Sans.
const FONT: &str = "sans-serif";

fn register_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The bytes are DejaVu Sans as the dejavu crate ships it: a valid TrueType font, so
        // registration cannot fail in practice; if it did, text would be missing, not the chart.
        let _ = plotters::style::register_font(
            FONT,
            plotters::style::FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Checks the size and readies the font.
fn prepare(size: (u32, u32)) -> Result<(), PlotError> {
    let (width, height) = size;
    if width < MIN_WIDTH || height < MIN_HEIGHT || width > MAX_SIDE || height > MAX_SIDE {
        return Err(PlotError::Size(width, height));
    }
    register_font();
    Ok(())
}

/// Maps any plotters error to [`PlotError::Draw`] for `path`.
fn draw_error(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> PlotError + '_ {
    move |err| PlotError::Draw {
        path: path.display().to_string(),
        reason: err.to_string(),
    }
}

/// Runs a drawing closure and converts its plotters error.
fn drawn<T, E: std::fmt::Display>(path: &Path, result: Result<T, E>) -> Result<T, PlotError> {
    result.map_err(|err| draw_error(path)(&err))
}

/// Draws the series legend of `chart` at `position`, in the style every chart shares.
fn draw_legend<'a, DB, CT>(
    chart: &mut plotters::chart::ChartContext<'a, DB, CT>,
    position: plotters::chart::SeriesLabelPosition,
    path: &Path,
) -> Result<(), PlotError>
where
    DB: plotters::prelude::DrawingBackend + 'a,
    CT: plotters::coord::CoordTranslate,
{
    use plotters::style::{Color, RGBColor, WHITE};
    drawn(
        path,
        chart
            .configure_series_labels()
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .position(position)
            .draw(),
    )
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::path::Path;

    /// Decodes `path` as a PNG and returns its size: the file must be a valid image.
    pub fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).expect("chart written");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        let image = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .expect("a decodable PNG");
        (image.width(), image.height())
    }

    /// Pixels of `path` whose colour is exactly `rgb`.
    pub fn pixels_of(path: &Path, rgb: [u8; 3]) -> usize {
        let image = image::open(path).expect("decodable").to_rgb8();
        image.pixels().filter(|p| p.0 == rgb).count()
    }
}
