//! `DIR/plot.png`: loss and accuracy per epoch, redrawn after every epoch.
//!
//! Text needs a font; plotters draws it with ab_glyph from a TTF file. The
//! first DejaVu Sans found on the system is used (Debian's
//! `fonts-dejavu-core`); without one the plot is drawn without labels rather
//! than not at all.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::rundir::EpochRow;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a system font once; false when there is none.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        for path in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Why a plot could not be drawn: plotters' error, as it says it.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct PlotError(#[from] DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>);

/// Draws train/test loss and test accuracy per epoch into `path`.
pub fn draw(path: &Path, rows: &[EpochRow]) -> Result<(), PlotError> {
    if rows.is_empty() {
        return Ok(());
    }
    let text = font_ready();
    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let last = rows.last().map_or(1, |r| r.epoch).max(2);
    let max_loss = rows.iter().flat_map(|r| [r.train_loss, r.test_loss]).fold(0.0f64, f64::max).max(1e-3) * 1.1;

    let mut chart = ChartBuilder::on(&left);
    chart.margin(15).x_label_area_size(if text { 35 } else { 5 }).y_label_area_size(if text { 50 } else { 5 });
    if text {
        chart.caption("loss", ("sans-serif", 20));
    }
    let mut loss = chart.build_cartesian_2d(1u32..last, 0f64..max_loss)?;
    if text {
        loss.configure_mesh().x_desc("epoch").draw()?;
    }
    loss.draw_series(LineSeries::new(rows.iter().map(|r| (r.epoch, r.train_loss)), BLUE.stroke_width(2)))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    loss.draw_series(LineSeries::new(rows.iter().map(|r| (r.epoch, r.test_loss)), RED.stroke_width(2)))?
        .label("test")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    if text {
        loss.configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }

    let mut chart = ChartBuilder::on(&right);
    chart.margin(15).x_label_area_size(if text { 35 } else { 5 }).y_label_area_size(if text { 50 } else { 5 });
    if text {
        chart.caption("test accuracy", ("sans-serif", 20));
    }
    let mut acc = chart.build_cartesian_2d(1u32..last, 0f64..1f64)?;
    if text {
        acc.configure_mesh().x_desc("epoch").draw()?;
    }
    acc.draw_series(LineSeries::new(rows.iter().map(|r| (r.epoch, r.test_accuracy)), GREEN.stroke_width(2)))?;
    root.present()?;
    Ok(())
}
