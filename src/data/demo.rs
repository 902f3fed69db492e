//! `cip data demo`: a small labelled image set drawn by code, so the whole pipeline runs anywhere
//! without downloading data.
//!
//! Each class is a family of pictures (discs, stripes, squares, gradients, ...) with random colours,
//! positions, sizes and pixel noise, so a classifier can learn them but not from one pixel. Folder
//! ids are the WordNet ids of the ImageNette classes and `classes.csv` gives their CLIP-style prompt
//! names, so prompts read like the paper's ("a photo of tench, ...").
//!
//! Every picture comes from its own random stream, seeded by (seed, split, class, index): changing
//! the counts adds or drops pictures without changing the others. Same seed, same bytes. Files that
//! already hold the right bytes are not rewritten, so their mtimes (and with them the dataset
//! fingerprint and every cached node keyed on it) survive a rerun.

use std::path::{Path, PathBuf};

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage};
use rayon::prelude::*;

use super::{io_err, write_if_changed, DataError, IMAGENETTE_CLASSES};

pub const SPLITS: [&str; 2] = ["train", "val"];

/// The picture family of each class, in class order. There is one per ImageNette class, which
/// bounds `--classes`.
pub const FAMILIES: [Family; 10] = [
    Family::Disc,
    Family::Stripes,
    Family::Square,
    Family::Gradient,
    Family::Checkerboard,
    Family::Cross,
    Family::Triangle,
    Family::Ring,
    Family::Dots,
    Family::DiagonalStripes,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Disc,
    Stripes,
    Square,
    Gradient,
    Checkerboard,
    Cross,
    Triangle,
    Ring,
    Dots,
    DiagonalStripes,
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    pub classes: usize,
    pub train_per_class: usize,
    pub val_per_class: usize,
    /// Width and height in pixels.
    pub size: u32,
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            out: PathBuf::from("experiments/data/demo"),
            classes: 4,
            train_per_class: 6,
            val_per_class: 4,
            size: 32,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DemoSummary {
    /// (WordNet id, prompt name) of each class drawn.
    pub classes: Vec<(String, String)>,
    pub images: usize,
    /// Files (images and classes.csv) written because they were missing or differed.
    pub written: usize,
    pub unchanged: usize,
    /// Stale pictures of an earlier, larger draw.
    pub removed: usize,
}

pub const MIN_SIZE: u32 = 8;
pub const MAX_SIZE: u32 = 1024;

/// Draws the set into `opts.out`: `train/<wnid>/train_NNNN.png`, `val/<wnid>/val_NNNN.png` and
/// `classes.csv`.
pub fn draw(opts: &DemoOptions) -> Result<DemoSummary, DataError> {
    if opts.classes == 0 || opts.classes > FAMILIES.len() {
        return Err(DataError::Argument {
            arg: "--classes".into(),
            message: format!(
                "{} is out of range: the demo draws 1 to {} classes (one picture family each)",
                opts.classes,
                FAMILIES.len()
            ),
        });
    }
    if !(MIN_SIZE..=MAX_SIZE).contains(&opts.size) {
        return Err(DataError::Argument {
            arg: "--size".into(),
            message: format!(
                "{} is out of range: pictures are {MIN_SIZE} to {MAX_SIZE} pixels wide",
                opts.size
            ),
        });
    }
    let mut summary = DemoSummary {
        classes: IMAGENETTE_CLASSES[..opts.classes]
            .iter()
            .map(|(id, name)| (id.to_string(), name.to_string()))
            .collect(),
        ..DemoSummary::default()
    };

    let mut jobs = Vec::new();
    for (split_index, split) in SPLITS.iter().enumerate() {
        let count = if *split == "train" {
            opts.train_per_class
        } else {
            opts.val_per_class
        };
        for (class, (wnid, _)) in IMAGENETTE_CLASSES.iter().enumerate().take(opts.classes) {
            for k in 0..count {
                let path = opts
                    .out
                    .join(split)
                    .join(wnid)
                    .join(format!("{split}_{k:04}.png"));
                jobs.push((path, split_index as u64, class, k as u64));
            }
        }
    }
    // Drawing and encoding dominate; writing stays sequential and in a fixed order.
    let encoded: Vec<Result<(PathBuf, Vec<u8>), DataError>> = jobs
        .into_par_iter()
        .map(|(path, split, class, k)| {
            let mut rng = Rng::stream(opts.seed, &[split, class as u64, k]);
            let img = picture(FAMILIES[class], opts.size, &mut rng);
            let png = encode_png(&img).map_err(|source| DataError::Image {
                path: path.clone(),
                source,
            })?;
            Ok((path, png))
        })
        .collect();
    let mut expected = std::collections::BTreeSet::new();
    for item in encoded {
        let (path, png) = item?;
        if write_if_changed(&path, &png)? {
            summary.written += 1;
        } else {
            summary.unchanged += 1;
        }
        summary.images += 1;
        expected.insert(path);
    }
    summary.removed = remove_stale(&opts.out, &expected)?;

    let mut csv = String::from(
        "# cip data demo: drawn pictures, one family per class (disc, stripes, square, gradient, ...)\n\
         # ids: the ImageNette WordNet ids; names: their CLIP-style ImageNet prompt names\n",
    );
    csv.push_str("id,name\n");
    for (id, name) in &summary.classes {
        csv.push_str(&format!("{id},{name}\n"));
    }
    if write_if_changed(&opts.out.join("classes.csv"), csv.as_bytes())? {
        summary.written += 1;
    } else {
        summary.unchanged += 1;
    }
    Ok(summary)
}

/// Removes demo pictures (`<split>_NNNN.png` under a demo class folder) that the current draw does
/// not produce, then class folders left empty. Nothing else is touched.
fn remove_stale(
    out: &Path,
    expected: &std::collections::BTreeSet<PathBuf>,
) -> Result<usize, DataError> {
    let mut removed = 0;
    for split in SPLITS {
        for (wnid, _) in IMAGENETTE_CLASSES {
            let dir = out.join(split).join(wnid);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.map_err(io_err(&dir))?.path();
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                let ours = name.starts_with(&format!("{split}_")) && name.ends_with(".png");
                if ours && !expected.contains(&path) {
                    std::fs::remove_file(&path).map_err(io_err(&path))?;
                    removed += 1;
                }
            }
            // Fails (and is left alone) when the folder still holds something.
            let _ = std::fs::remove_dir(&dir);
        }
    }
    Ok(removed)
}

/// PNG bytes with fixed settings, so the same pixels always give the same file.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>, image::ImageError> {
    let mut buf = Vec::new();
    PngEncoder::new_with_quality(&mut buf, CompressionType::Default, FilterType::Adaptive)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )?;
    Ok(buf)
}

/// One picture of a family: a foreground shape (or pattern) over a background, plus noise.
pub fn picture(family: Family, size: u32, rng: &mut Rng) -> RgbImage {
    let (bg, fg) = contrasting_colours(rng);
    let coverage = mask(family, size, rng);
    let mut img = RgbImage::new(size, size);
    for (i, t) in coverage.into_iter().enumerate() {
        let mut pixel = [0u8; 3];
        for c in 0..3 {
            let v = bg[c] + (fg[c] - bg[c]) * t + rng.range(-12.0, 12.0);
            pixel[c] = v.round().clamp(0.0, 255.0) as u8;
        }
        img.put_pixel(i as u32 % size, i as u32 / size, Rgb(pixel));
    }
    img
}

/// How much each pixel (row-major) belongs to the foreground, 0 to 1.
pub fn mask(family: Family, size: u32, rng: &mut Rng) -> Vec<f32> {
    let s = size as f32;
    // Shape parameters, as fractions of the side, with floors in pixels so that small pictures
    // still show every shape.
    let cx = rng.range(0.3, 0.7) * s;
    let cy = rng.range(0.3, 0.7) * s;
    let period = (rng.range(0.15, 0.3) * s).max(3.0);
    let phase = rng.range(0.0, 1.0);
    let extent = (rng.range(0.15, 0.3) * s).max(1.5);
    let angle = rng.range(0.0, std::f32::consts::TAU);
    let thickness = rng.range(0.3, 0.45);
    let inside = |b: bool| b as u8 as f32;
    let stripe = |t: f32| inside((t / period + phase).rem_euclid(1.0) < 0.5);
    let mut out = Vec::with_capacity((size * size) as usize);
    for y in 0..size {
        for x in 0..size {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let (dx, dy) = (px - cx, py - cy);
            out.push(match family {
                Family::Disc => inside(dx.hypot(dy) < extent),
                Family::Stripes => stripe(py),
                Family::Square => inside(dx.abs() < extent && dy.abs() < extent),
                Family::Gradient => {
                    // Linear ramp along a random direction, across the whole picture.
                    let (ux, uy) = (angle.cos(), angle.sin());
                    let proj = (px - s / 2.0) * ux + (py - s / 2.0) * uy;
                    (proj / (s * 0.71) + 0.5).clamp(0.0, 1.0)
                }
                Family::Checkerboard => {
                    let a = ((px / period + phase).floor() as i64)
                        + ((py / period + phase).floor() as i64);
                    inside(a.rem_euclid(2) == 0)
                }
                Family::Cross => {
                    let (arm, half) = (extent * 1.3, (extent * 0.3).max(0.75));
                    inside(
                        (dx.abs() < half && dy.abs() < arm) || (dy.abs() < half && dx.abs() < arm),
                    )
                }
                Family::Triangle => {
                    // Apex up; the half-width grows linearly from the apex to the base.
                    let h = extent * 2.0;
                    let depth = (py - (cy - h / 2.0)) / h;
                    inside((0.0..=1.0).contains(&depth) && dx.abs() < depth * extent * 1.2)
                }
                Family::Ring => {
                    let (d, outer) = (dx.hypot(dy), extent * 1.2);
                    inside(d < outer && d > outer - (outer * thickness).max(1.0))
                }
                Family::Dots => {
                    let fx = (px / period + phase).rem_euclid(1.0) - 0.5;
                    let fy = (py / period + phase).rem_euclid(1.0) - 0.5;
                    inside(fx.hypot(fy) < 0.3)
                }
                Family::DiagonalStripes => stripe((px + py) * std::f32::consts::FRAC_1_SQRT_2),
            });
        }
    }
    out
}

/// A background and a foreground colour far enough apart for the shape to show.
fn contrasting_colours(rng: &mut Rng) -> ([f32; 3], [f32; 3]) {
    let colour = |rng: &mut Rng| [0, 1, 2].map(|_| rng.range(0.0, 255.0));
    let bg = colour(rng);
    let mut fg = colour(rng);
    // Bounded: after a few draws take the complement, which is always far enough.
    for _ in 0..8 {
        let dist = (0..3).map(|c| (fg[c] - bg[c]).powi(2)).sum::<f32>().sqrt();
        if dist > 150.0 {
            return (bg, fg);
        }
        fg = colour(rng);
    }
    (bg, bg.map(|v| 255.0 - v))
}

/// splitmix64: tiny, fast, and fixed here, so the pictures never change with a dependency's
/// version (rand's generators make no such promise across releases).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// An independent stream for a seed and a path of indices.
    pub fn stream(seed: u64, path: &[u64]) -> Rng {
        let mut rng = Rng(seed);
        for &p in path {
            let mixed = rng.next_u64() ^ p.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            rng = Rng(mixed);
        }
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_differ_and_repeat() {
        let a: Vec<u64> = (0..4)
            .map(|_| Rng::stream(7, &[0, 1, 2]).next_u64())
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut seen = std::collections::HashSet::new();
        for split in 0..2 {
            for class in 0..10 {
                for k in 0..20 {
                    assert!(seen.insert(Rng::stream(7, &[split, class, k]).next_u64()));
                }
            }
        }
    }

    #[test]
    fn every_family_shows_its_shape() {
        // The foreground neither vanishes nor fills the picture, at the demo size and a large one,
        // whatever the random position and size: otherwise a class would be pure colour noise.
        for family in FAMILIES {
            for size in [MIN_SIZE, 32, 128] {
                for k in 0..50 {
                    let m = mask(family, size, &mut Rng::stream(11, &[k]));
                    let share = m.iter().sum::<f32>() / m.len() as f32;
                    assert!(
                        (0.04..=0.96).contains(&share),
                        "{family:?} at {size}px, stream {k}: foreground share {share}"
                    );
                }
            }
        }
    }
}
