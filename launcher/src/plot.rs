//! `DIR/plot.png`: loss and accuracy per epoch, redrawn after every epoch,
//! continuing the resumed run's curve when the run resumed one.
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

/// What the plot says beside the figures.
#[derive(Debug, Clone, Copy)]
pub struct Chart<'a> {
    /// The job's name, the plot's title.
    pub title: &'a str,
    /// The first epoch of this run when it resumed another (whose epochs
    /// come before it): marked with a vertical line.
    pub resumed_at: Option<u32>,
    /// Epochs the job file asks for, said in the title.
    pub total_epochs: u32,
}

/// An axis range around `values` (finite ones), padded by a tenth of the
/// spread and kept inside `bounds`; a flat or empty series gets a small span.
fn scaled(values: impl Iterator<Item = f64>, bounds: (f64, f64)) -> std::ops::Range<f64> {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return bounds.0.max(0.0)..bounds.1.min(1.0);
    }
    let pad = ((hi - lo) * 0.1).max(hi.abs().max(1e-3) * 0.02);
    (lo - pad).max(bounds.0)..(hi + pad).min(bounds.1)
}

/// Draws train and test loss (left) and test accuracy (right) per epoch
/// into `path`, with the job as title, labelled and scaled axes. Values that
/// are not numbers (a program of the user's that reports no test figures)
/// are left out.
pub fn draw(path: &Path, chart: &Chart<'_>, rows: &[EpochRow]) -> Result<(), PlotError> {
    if rows.is_empty() {
        return Ok(());
    }
    let text = font_ready();
    let root = BitMapBackend::new(path, (1000, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = if text {
        let last = rows.last().map_or(0, |r| r.epoch);
        let title = format!("{}: epoch {last} of {}", chart.title, chart.total_epochs);
        root.titled(&title, ("sans-serif", 22))?
    } else {
        root
    };
    let (left, right) = root.split_horizontally(500);
    let epochs = rows.first().map_or(1, |r| r.epoch)..rows.last().map_or(1, |r| r.epoch).max(rows[0].epoch + 1);
    let finite =
        |series: Vec<(u32, f64)>| -> Vec<(u32, f64)> { series.into_iter().filter(|(_, v)| v.is_finite()).collect() };
    let train = finite(rows.iter().map(|r| (r.epoch, r.train_loss)).collect());
    let test = finite(rows.iter().map(|r| (r.epoch, r.test_loss)).collect());
    let accuracy = finite(rows.iter().map(|r| (r.epoch, r.test_accuracy)).collect());

    // A program of the user's may have a loss below zero.
    let loss_axis = scaled(train.iter().chain(&test).map(|p| p.1), (f64::NEG_INFINITY, f64::INFINITY));
    let mut chart_l = ChartBuilder::on(&left);
    chart_l.margin(15).x_label_area_size(if text { 40 } else { 5 }).y_label_area_size(if text { 60 } else { 5 });
    if text {
        chart_l.caption("loss", ("sans-serif", 18));
    }
    let mut loss = chart_l.build_cartesian_2d(epochs.clone(), loss_axis.clone())?;
    if text {
        loss.configure_mesh().x_desc("epoch").y_desc("mean cross-entropy").draw()?;
    }
    if let Some(at) = chart.resumed_at {
        loss.draw_series(LineSeries::new([(at, loss_axis.start), (at, loss_axis.end)], BLACK.mix(0.4)))?
            .label("resumed")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
    }
    loss.draw_series(LineSeries::new(train, BLUE.stroke_width(2)))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    if !test.is_empty() {
        loss.draw_series(LineSeries::new(test, RED.stroke_width(2)))?
            .label("test")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    }
    if text {
        loss.configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }

    let acc_axis = scaled(accuracy.iter().map(|p| p.1), (0.0, 1.0));
    let mut chart_r = ChartBuilder::on(&right);
    chart_r.margin(15).x_label_area_size(if text { 40 } else { 5 }).y_label_area_size(if text { 60 } else { 5 });
    if text {
        chart_r.caption("test accuracy", ("sans-serif", 18));
    }
    let mut acc = chart_r.build_cartesian_2d(epochs, acc_axis.clone())?;
    if text {
        acc.configure_mesh().x_desc("epoch").y_desc("fraction correct").draw()?;
    }
    if let Some(at) = chart.resumed_at {
        acc.draw_series(LineSeries::new([(at, acc_axis.start), (at, acc_axis.end)], BLACK.mix(0.4)))?;
    }
    acc.draw_series(LineSeries::new(accuracy, GREEN.stroke_width(2)))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_fit_the_values_not_a_fixed_range() {
        let r = scaled([0.80, 0.82, 0.85].into_iter(), (0.0, 1.0));
        assert!(r.start > 0.7 && r.start < 0.8 && r.end > 0.85 && r.end < 0.9, "{r:?}");
        let r = scaled([0.99, 1.0].into_iter(), (0.0, 1.0));
        assert!(r.end <= 1.0 && r.start < 0.99, "{r:?}");
        let r = scaled([2.0, f64::NAN].into_iter(), (0.0, f64::INFINITY));
        assert!(r.start < 2.0 && r.end > 2.0, "a flat series gets a span: {r:?}");
        assert_eq!(scaled(std::iter::empty(), (0.0, 1.0)), 0.0..1.0);
    }

    /// A resumed run's plot: earlier epochs, a resume marker, epochs
    /// without test figures; drawn without error as a PNG.
    #[test]
    fn a_resumed_curve_with_gaps_is_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plot.png");
        let rows: Vec<EpochRow> = (3..9)
            .map(|e| EpochRow {
                epoch: e,
                train_loss: 2.0 / f64::from(e),
                test_loss: if e == 5 { f64::NAN } else { 1.5 / f64::from(e) },
                test_accuracy: if e == 5 { f64::NAN } else { 0.6 + f64::from(e) / 50.0 },
                steps: 1,
                samples_per_s: 1.0,
                slowest_worker_samples_per_s: 1.0,
                bytes_pushed: 0,
                bytes_pulled: 0,
                elapsed_s: 1.0,
            })
            .collect();
        draw(&path, &Chart { title: "job", resumed_at: Some(6), total_epochs: 10 }, &rows).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    }
}
