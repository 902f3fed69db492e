//! Top-1 (or the report's first metric) against guidance scale, one line per prompt strategy; rows
//! that do not depend on guidance (real data) are drawn as flat reference lines.

use std::path::Path;

use plotters::prelude::*;

use super::draw::{draw_error, register_font, save_png, FONT};
use super::{ReportError, Table};

pub const PLOT_W: u32 = 800;
pub const PLOT_H: u32 = 500;

/// The sweep axis to put on x: the one named `guidance` (or ending in `.guidance`), else the first
/// axis whose labels are all numbers; it needs at least two distinct values.
pub fn x_axis(table: &Table) -> Option<usize> {
    let numeric = |ai: usize| {
        let mut values: Vec<f64> = Vec::new();
        for r in &table.rows {
            if r[ai] == "*" {
                continue;
            }
            let v = r[ai].parse::<f64>().ok()?;
            if !values.contains(&v) {
                values.push(v);
            }
        }
        (values.len() >= 2).then_some(())
    };
    let axes = &table.columns[..table.axes];
    let named = axes
        .iter()
        .position(|a| a == "guidance" || a.ends_with(".guidance"));
    named
        .filter(|&i| numeric(i).is_some())
        .or_else(|| (0..axes.len()).find(|&i| numeric(i).is_some()))
}

/// One series: its label and (x, y) points; `flat` series have no x (drawn across the plot).
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    flat: Option<f64>,
}

/// Draws metric column `col` (an index into `table.columns`) against axis `x` into `out`.
pub fn write_plot(
    table: &Table,
    x: usize,
    col: usize,
    title: &str,
    out: &Path,
) -> Result<(u32, u32), ReportError> {
    let mut series: Vec<Series> = Vec::new();
    for r in &table.rows {
        let Ok(y) = r[col].parse::<f64>() else {
            continue;
        };
        let label = (0..table.axes)
            .filter(|&a| a != x)
            .map(|a| r[a].clone())
            .collect::<Vec<_>>()
            .join(", ");
        let label = if label.is_empty() {
            "result".to_string()
        } else {
            label
        };
        let i = match series.iter().position(|s| s.label == label) {
            Some(i) => i,
            None => {
                series.push(Series {
                    label,
                    points: Vec::new(),
                    flat: None,
                });
                series.len() - 1
            }
        };
        match r[x].parse::<f64>() {
            Ok(xv) => series[i].points.push((xv, y)),
            Err(_) => series[i].flat = Some(y),
        }
    }
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1).chain(s.flat))
        .collect();
    let (x_min, x_max) = bounds(&xs, 0.0);
    let (y_min, y_max) = bounds(&ys, 2.0);
    let y_min = y_min.max(0.0);
    let y_max = y_max.min(100.0).max(y_min + 1.0);

    register_font();
    let err = draw_error(out);
    let mut rgb = vec![255u8; (PLOT_W * PLOT_H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (PLOT_W, PLOT_H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(x_min..x_max, y_min..y_max)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc(table.columns[x].as_str())
            .y_desc(table.columns[col].as_str())
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let (points, label) = match s.flat {
                Some(y) if s.points.is_empty() => (
                    vec![(x_min, y), (x_max, y)],
                    format!("{} (any {})", s.label, table.columns[x]),
                ),
                _ => (s.points.clone(), s.label.clone()),
            };
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(label)
                .legend(move |(lx, ly)| {
                    PathElement::new(vec![(lx, ly), (lx + 20, ly)], color.stroke_width(2))
                });
            if s.flat.is_none() {
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    save_png(out, PLOT_W, PLOT_H, rgb)?;
    Ok((PLOT_W, PLOT_H))
}

/// Min and max with `margin` added, widened when all values are equal.
fn bounds(values: &[f64], margin: f64) -> (f64, f64) {
    let lo = values.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        return (lo - margin.max(0.5), hi + margin.max(0.5));
    }
    (lo - margin, hi + margin)
}
