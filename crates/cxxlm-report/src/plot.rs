//! PNG charts: lines over steps, and horizontal bars for counts by category.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};
use std::path::Path;
use std::sync::OnceLock;

use crate::ReportError;

/// Where Debian's `fonts-dejavu-core` and common distributions keep a sans-serif font.
const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a font for the charts' text, once: `CXXLM_FONT` (a TrueType file) or a
/// system font; an error names what to install.
pub fn font_ready() -> Result<(), ReportError> {
    static READY: OnceLock<bool> = OnceLock::new();
    let ready = *READY.get_or_init(|| {
        let chosen = std::env::var("CXXLM_FONT").ok();
        let found = chosen
            .iter()
            .map(String::as_str)
            .chain(FONT_PATHS)
            .any(|p| {
                std::fs::read(p).is_ok_and(|bytes| {
                    register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into())).is_ok()
                })
            });
        found
    });
    if ready {
        Ok(())
    } else {
        Err(ReportError::Plot(format!(
            "no TrueType font found (looked for {}); install fonts-dejavu-core or set CXXLM_FONT",
            FONT_PATHS.join(", ")
        )))
    }
}

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

fn plot_error(path: &Path, e: impl std::fmt::Display) -> ReportError {
    ReportError::Plot(format!("{}: {e}", path.display()))
}

fn range(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-9);
    (lo - pad, hi + pad)
}

/// Line chart of every series against a shared x axis.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), ReportError> {
    font_ready()?;
    let points = || series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = range(points().map(|p| p.0));
    let (y0, y1) = range(points().map(|p| p.1));
    let root = BitMapBackend::new(path, (800, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| plot_error(path, e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| plot_error(path, e))?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let drawn = if s.points.len() < 30 {
            chart.draw_series(
                LineSeries::new(s.points.iter().copied(), color.stroke_width(2)).point_size(3),
            )
        } else {
            chart.draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
        };
        drawn
            .map_err(|e| plot_error(path, e))?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| plot_error(path, e))?;
    }
    root.present().map_err(|e| plot_error(path, e))
}

/// Horizontal bars, one per (label, value), top to bottom in the given order; each
/// labelled at its end with its name and value.
pub fn bars(
    path: &Path,
    title: &str,
    x_label: &str,
    bars: &[(String, f64)],
) -> Result<(), ReportError> {
    font_ready()?;
    let n = bars.len().max(1);
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9);
    let root = BitMapBackend::new(path, (800, 90 + 34 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(8)
        .build_cartesian_2d(0.0..max * 1.8, 0.0..n as f64)
        .map_err(|e| plot_error(path, e))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc(x_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| plot_error(path, e))?;
    let y_of = |i: usize| (n - 1 - i) as f64;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
            Rectangle::new(
                [(0.0, y_of(i) + 0.15), (*v, y_of(i) + 0.85)],
                COLORS[0].filled(),
            )
        }))
        .map_err(|e| plot_error(path, e))?;
    let style =
        TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (name, v))| {
            Text::new(
                format!("{name} ({v})"),
                (v + max * 0.02, y_of(i) + 0.5),
                style.clone(),
            )
        }))
        .map_err(|e| plot_error(path, e))?;
    root.present().map_err(|e| plot_error(path, e))
}
