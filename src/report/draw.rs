//! Text and pictures on an RGB buffer: plotters draws text (with the bundled DejaVu Sans, so every
//! machine renders the same pixels, fonts installed or not) and `image` encodes the PNG.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use super::ReportError;

/// The one font family name registered with plotters.
pub const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");

pub fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType file compiled into the binary; failure is a build bug.
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES)
            .unwrap_or_else(|_| panic!("the bundled DejaVuSans.ttf does not parse"));
    });
}

pub fn draw_error(path: &Path) -> impl Fn(String) -> ReportError + '_ {
    move |message| ReportError::Invalid {
        path: path.to_path_buf(),
        message: format!("drawing failed: {message}"),
    }
}

/// Splits `text` into at most `max_lines` lines no wider than `width` pixels in `style`, ending
/// the last with `…` when the text does not fit.
pub fn wrap(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    text: &str,
    style: &TextStyle<'_>,
    width: u32,
    max_lines: usize,
) -> Vec<String> {
    let fits = |s: &str| {
        area.estimate_text_size(s, style)
            .map(|(w, _)| w <= width)
            .unwrap_or(true)
    };
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for word in text.split_whitespace() {
        let candidate = if current.is_empty() {
            word.to_string()
        } else {
            format!("{current} {word}")
        };
        if fits(&candidate) || current.is_empty() {
            current = candidate;
        } else {
            lines.push(std::mem::replace(&mut current, word.to_string()));
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    if lines.len() > max_lines {
        lines.truncate(max_lines);
        let last = lines.last_mut().unwrap();
        while !last.is_empty() && !fits(&format!("{last}…")) {
            last.pop();
        }
        last.push('…');
    }
    lines
}

pub fn save_png(path: &Path, width: u32, height: u32, rgb: Vec<u8>) -> Result<(), ReportError> {
    let img = image::RgbImage::from_raw(width, height, rgb).expect("buffer matches its size");
    img.save(path).map_err(|e| ReportError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
