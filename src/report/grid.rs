//! Sample grids of a generated image set: rows are classes, columns samples, the prompt under each
//! image. One PNG per generate entry that feeds the report.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use super::draw::{draw_error, register_font, save_png, wrap, FONT};
use super::ReportError;
use crate::data::table::CsvTable;

/// Rows shown: up to this many classes, spread evenly over the class list.
pub const GRID_CLASSES: usize = 10;
/// Columns: the first images (by id) of each class.
pub const GRID_SAMPLES: usize = 4;
pub const THUMB: u32 = 128;
const PAD: u32 = 8;
const LABEL_W: u32 = 150;
const TITLE_H: u32 = 30;
const CAPTION_LINES: usize = 4;
const LINE_H: u32 = 13;
const CAPTION_H: u32 = CAPTION_LINES as u32 * LINE_H + 4;

/// The pixel size of a grid with `classes` rows and `samples` columns.
pub fn grid_size(classes: usize, samples: usize) -> (u32, u32) {
    (
        LABEL_W + samples as u32 * (THUMB + PAD) + PAD,
        TITLE_H + classes as u32 * (THUMB + CAPTION_H + PAD) + PAD,
    )
}

/// Draws the grid of the image set in `entry_dir` (its `manifest.csv`) into `out`.
pub fn write_grid(entry_dir: &Path, title: &str, out: &Path) -> Result<(u32, u32), ReportError> {
    let manifest = entry_dir.join("manifest.csv");
    let table = CsvTable::read(&manifest).map_err(|e| ReportError::Invalid {
        path: manifest.clone(),
        message: e.to_string(),
    })?;
    let col = |name: &str| {
        table.column(name).ok_or_else(|| ReportError::Invalid {
            path: manifest.clone(),
            message: format!("no `{name}` column"),
        })
    };
    let (id_col, path_col, class_col, prompt_col) =
        (col("id")?, col("path")?, col("class")?, col("prompt")?);
    // class -> (id, path, prompt), ids sorted, so the grid does not depend on generation order.
    let mut by_class: BTreeMap<String, Vec<(String, String, String)>> = BTreeMap::new();
    for r in &table.rows {
        by_class.entry(r[class_col].to_string()).or_default().push((
            r[id_col].to_string(),
            r[path_col].to_string(),
            r[prompt_col].to_string(),
        ));
    }
    let classes: Vec<&String> = by_class.keys().collect();
    let shown: Vec<&String> = if classes.len() <= GRID_CLASSES {
        classes.clone()
    } else {
        (0..GRID_CLASSES)
            .map(|i| classes[i * classes.len() / GRID_CLASSES])
            .collect()
    };
    let samples = shown
        .iter()
        .map(|c| by_class[*c].len().min(GRID_SAMPLES))
        .max()
        .unwrap_or(0)
        .max(1);
    let (w, h) = grid_size(shown.len(), samples);
    let mut rgb = vec![255u8; (w * h * 3) as usize];

    // Pictures first, straight into the buffer; text on top through plotters.
    let mut captions: Vec<(u32, u32, String)> = Vec::new();
    for (row, class) in shown.iter().enumerate() {
        let mut items = by_class[*class].clone();
        items.sort();
        let y0 = TITLE_H + row as u32 * (THUMB + CAPTION_H + PAD);
        for (c, (_, rel, prompt)) in items.iter().take(samples).enumerate() {
            let x0 = LABEL_W + PAD + c as u32 * (THUMB + PAD);
            let path = entry_dir.join(rel);
            let img = image::open(&path)
                .map_err(|e| ReportError::Invalid {
                    path: path.clone(),
                    message: e.to_string(),
                })?
                .to_rgb8();
            // Tiny test images are scaled up with visible pixels rather than blurred.
            let filter = if img.width() * 2 < THUMB {
                image::imageops::FilterType::Nearest
            } else {
                image::imageops::FilterType::Triangle
            };
            let thumb = image::imageops::resize(&img, THUMB, THUMB, filter);
            for (x, y, p) in thumb.enumerate_pixels() {
                let i = (((y0 + y) * w + x0 + x) * 3) as usize;
                rgb[i..i + 3].copy_from_slice(&p.0);
            }
            captions.push((x0, y0 + THUMB + 2, prompt.clone()));
        }
    }

    register_font();
    let err = draw_error(out);
    {
        let area = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        let title_style = TextStyle::from((FONT, 16).into_font()).color(&BLACK);
        let label_style = TextStyle::from((FONT, 13).into_font()).color(&BLACK);
        let caption_style = TextStyle::from((FONT, 11).into_font()).color(&RGBColor(40, 40, 40));
        area.draw(&Text::new(title.to_string(), (PAD as i32, 7), &title_style))
            .map_err(|e| err(e.to_string()))?;
        for (row, class) in shown.iter().enumerate() {
            let y0 = TITLE_H + row as u32 * (THUMB + CAPTION_H + PAD);
            for (k, line) in wrap(&area, class, &label_style, LABEL_W - 2 * PAD, 3)
                .iter()
                .enumerate()
            {
                let pos = (PAD as i32, (y0 + THUMB / 2) as i32 + k as i32 * 15 - 8);
                area.draw(&Text::new(line.clone(), pos, &label_style))
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        for (x, y, prompt) in &captions {
            for (k, line) in wrap(&area, prompt, &caption_style, THUMB, CAPTION_LINES)
                .iter()
                .enumerate()
            {
                let pos = (*x as i32, (*y + k as u32 * LINE_H) as i32);
                area.draw(&Text::new(line.clone(), pos, &caption_style))
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        area.present().map_err(|e| err(e.to_string()))?;
    }
    save_png(out, w, h, rgb)?;
    Ok((w, h))
}
