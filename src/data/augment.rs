//! Image preprocessing for the classifier: decode, RandomResizedCrop + horizontal flip for
//! training, a plain resize for evaluation, then per-channel normalisation into NCHW f32.
//!
//! Training augmentation is a pure function of (seed, epoch, item index): every item gets its own
//! ChaCha stream, so results do not depend on batch composition, thread count or on resuming.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::RgbImage;
use ndarray::{Array3, Array4, ArrayViewMut3, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// CLIP's normalisation (the paper's default for its classifiers).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
/// ImageNet's normalisation.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Debug, thiserror::Error)]
pub enum AugmentError {
    #[error("{path}: cannot decode image: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("decode cache {path}: {source}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    #[default]
    Bicubic,
    Bilinear,
}

impl Interpolation {
    fn filter(self) -> FilterType {
        match self {
            Interpolation::Bicubic => FilterType::CatmullRom,
            Interpolation::Bilinear => FilterType::Triangle,
        }
    }
}

/// Training-time augmentation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainTransform {
    pub size: u32,
    pub scale: (f32, f32),
    pub ratio: (f32, f32),
    pub interpolation: Interpolation,
    pub flip: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl TrainTransform {
    pub fn new(size: u32, mean: [f32; 3], std: [f32; 3]) -> TrainTransform {
        TrainTransform {
            size,
            scale: (0.5, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            interpolation: Interpolation::Bicubic,
            flip: true,
            mean,
            std,
        }
    }
}

/// The RNG of one item in one epoch.
pub fn item_rng(seed: u64, epoch: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Streams are independent per (epoch, item) without hashing: ChaCha's 64-bit stream id.
    rng.set_stream(epoch.wrapping_mul(1 << 32) ^ index);
    rng
}

/// torchvision's RandomResizedCrop.get_params: up to 10 tries of (area, log-ratio), else a
/// centre crop with the ratio clamped into range. Returns (left, top, width, height).
pub fn random_crop_box(
    width: u32,
    height: u32,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut impl Rng,
) -> (u32, u32, u32, u32) {
    let area = (width * height) as f32;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(log_lo..=log_hi).exp();
        let w = (target * aspect).sqrt().round() as u32;
        let h = (target / aspect).sqrt().round() as u32;
        if w > 0 && h > 0 && w <= width && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (left, top, w, h);
        }
    }
    let in_ratio = width as f32 / height as f32;
    let (w, h) = if in_ratio < ratio.0 {
        (width, (width as f32 / ratio.0).round() as u32)
    } else if in_ratio > ratio.1 {
        ((height as f32 * ratio.1).round() as u32, height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

pub fn decode(path: &Path) -> Result<RgbImage, AugmentError> {
    image::open(path)
        .map(|img| img.to_rgb8())
        .map_err(|e| AugmentError::Decode {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Writes `img` (already size x size) normalised into a [3, size, size] view.
fn normalise_into(img: &RgbImage, mean: [f32; 3], std: [f32; 3], mut out: ArrayViewMut3<'_, f32>) {
    for (x, y, pixel) in img.enumerate_pixels() {
        for c in 0..3 {
            out[[c, y as usize, x as usize]] = (pixel[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
}

/// One training item: crop, resize, maybe flip, normalise.
pub fn train_item(
    img: &RgbImage,
    t: &TrainTransform,
    rng: &mut impl Rng,
    out: ArrayViewMut3<'_, f32>,
) {
    let (left, top, w, h) = random_crop_box(img.width(), img.height(), t.scale, t.ratio, rng);
    let crop = image::imageops::crop_imm(img, left, top, w, h).to_image();
    let mut resized = image::imageops::resize(&crop, t.size, t.size, t.interpolation.filter());
    if t.flip && rng.random_bool(0.5) {
        image::imageops::flip_horizontal_in_place(&mut resized);
    }
    normalise_into(&resized, t.mean, t.std, out);
}

/// A training batch: `paths[i]` is item `indices[i]` of the data set.
pub fn train_batch(
    paths: &[&Path],
    indices: &[u64],
    t: &TrainTransform,
    seed: u64,
    epoch: u64,
) -> Result<Array4<f32>, AugmentError> {
    let items: Vec<(usize, u64)> = indices.iter().enumerate().map(|(i, &id)| (i, id)).collect();
    train_batch_with(&items, |i| decode(paths[i]), t, seed, epoch)
}

/// A training batch of `items` = (what `load` takes, augmentation id), loaded in parallel.
pub fn train_batch_with(
    items: &[(usize, u64)],
    load: impl Fn(usize) -> Result<RgbImage, AugmentError> + Sync,
    t: &TrainTransform,
    seed: u64,
    epoch: u64,
) -> Result<Array4<f32>, AugmentError> {
    let items: Vec<Array3<f32>> = items
        .par_iter()
        .map(|&(image, index)| {
            let img = load(image)?;
            let mut rng = item_rng(seed, epoch, index);
            let mut out = Array3::<f32>::zeros((3, t.size as usize, t.size as usize));
            train_item(&img, t, &mut rng, out.view_mut());
            Ok(out)
        })
        .collect::<Result<_, AugmentError>>()?;
    Ok(stack(&items, t.size))
}

/// Decoded images kept as raw RGB files (`<id>.rgb`: u32 LE width, u32 LE height, pixels), each
/// first shrunk so its shorter side is at most `shorter_side` (never enlarged). Shrinking changes
/// the pixels RandomResizedCrop sees, so the bound is part of the train node's key; an image
/// already within the bound is stored as decoded and trains exactly as without the cache.
#[derive(Debug, Clone)]
pub struct DecodeCache {
    pub dir: PathBuf,
    pub shorter_side: u32,
    pub filter: Interpolation,
}

impl DecodeCache {
    /// The image `id` (decoded from `path` on the first call, read back after).
    pub fn load(&self, id: usize, path: &Path) -> Result<RgbImage, AugmentError> {
        let file = self.dir.join(format!("{id}.rgb"));
        let cache_error = |source| AugmentError::Cache {
            path: file.clone(),
            source,
        };
        if let Ok(bytes) = std::fs::read(&file) {
            if let Some(img) = Self::parse(&bytes) {
                return Ok(img);
            }
        }
        let img = self.shrink(decode(path)?);
        let mut bytes = Vec::with_capacity(8 + img.as_raw().len());
        bytes.extend(img.width().to_le_bytes());
        bytes.extend(img.height().to_le_bytes());
        bytes.extend(img.as_raw());
        std::fs::create_dir_all(&self.dir).map_err(cache_error)?;
        // Temp + rename: a kill mid-write must not leave a truncated entry behind.
        let tmp = self
            .dir
            .join(format!("{id}.rgb.{}.tmp", std::process::id()));
        std::fs::write(&tmp, &bytes).map_err(cache_error)?;
        std::fs::rename(&tmp, &file).map_err(cache_error)?;
        Ok(img)
    }

    fn shrink(&self, img: RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let short = w.min(h);
        if short <= self.shorter_side {
            return img;
        }
        let scale = self.shorter_side as f64 / short as f64;
        let (nw, nh) = if w <= h {
            (
                self.shorter_side,
                ((h as f64 * scale).round() as u32).max(1),
            )
        } else {
            (
                ((w as f64 * scale).round() as u32).max(1),
                self.shorter_side,
            )
        };
        image::imageops::resize(&img, nw, nh, self.filter.filter())
    }

    fn parse(bytes: &[u8]) -> Option<RgbImage> {
        let w = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
        let h = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
        RgbImage::from_raw(w, h, bytes.get(8..)?.to_vec())
    }
}

/// Stacks [3, s, s] items into [n, 3, s, s].
fn stack(items: &[Array3<f32>], size: u32) -> Array4<f32> {
    let s = size as usize;
    let mut batch = Array4::<f32>::zeros((items.len(), 3, s, s));
    for (mut slot, item) in batch.axis_iter_mut(Axis(0)).zip(items) {
        slot.assign(item);
    }
    batch
}

/// How evaluation brings an image to size x size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum EvalResize {
    /// Straight to size x size, aspect ratio not kept (the paper's evaluation).
    #[default]
    Square,
    /// torchvision's Resize(int(size / crop_pct)) on the shorter side, then CenterCrop(size).
    CenterCrop { crop_pct: f32 },
}

impl EvalResize {
    pub fn apply(self, img: &RgbImage, size: u32, interpolation: Interpolation) -> RgbImage {
        match self {
            EvalResize::Square => image::imageops::resize(img, size, size, interpolation.filter()),
            EvalResize::CenterCrop { crop_pct } => {
                let short_target = ((size as f32 / crop_pct) as u32).max(size);
                let (w, h) = img.dimensions();
                // torchvision: the shorter side becomes the target, the longer one int(target * long / short).
                let (nw, nh) = if w <= h {
                    (
                        short_target,
                        (short_target as u64 * h as u64 / w as u64) as u32,
                    )
                } else {
                    (
                        (short_target as u64 * w as u64 / h as u64) as u32,
                        short_target,
                    )
                };
                let resized = image::imageops::resize(img, nw, nh, interpolation.filter());
                let left = ((nw - size) as f32 / 2.0).round() as u32;
                let top = ((nh - size) as f32 / 2.0).round() as u32;
                image::imageops::crop_imm(&resized, left, top, size, size).to_image()
            }
        }
    }
}

/// An evaluation batch: each image resized to size x size, normalised.
pub fn eval_batch(
    paths: &[&Path],
    size: u32,
    interpolation: Interpolation,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<Array4<f32>, AugmentError> {
    eval_batch_with(paths, size, interpolation, EvalResize::Square, mean, std)
}

/// An evaluation batch brought to size x size by `resize`, normalised.
pub fn eval_batch_with(
    paths: &[&Path],
    size: u32,
    interpolation: Interpolation,
    resize: EvalResize,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<Array4<f32>, AugmentError> {
    let items: Vec<Array3<f32>> = paths
        .par_iter()
        .map(|path| {
            let img = decode(path)?;
            let resized = resize.apply(&img, size, interpolation);
            let mut out = Array3::<f32>::zeros((3, size as usize, size as usize));
            normalise_into(&resized, mean, std, out.view_mut());
            Ok(out)
        })
        .collect::<Result<_, AugmentError>>()?;
    Ok(stack(&items, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_box_stays_inside_and_is_deterministic() {
        for index in 0..50 {
            let a = random_crop_box(
                40,
                30,
                (0.5, 1.0),
                (0.75, 4.0 / 3.0),
                &mut item_rng(3, 1, index),
            );
            let b = random_crop_box(
                40,
                30,
                (0.5, 1.0),
                (0.75, 4.0 / 3.0),
                &mut item_rng(3, 1, index),
            );
            assert_eq!(a, b);
            let (l, t, w, h) = a;
            assert!(l + w <= 40 && t + h <= 30 && w > 0 && h > 0, "{a:?}");
            assert!(
                (w * h) as f32 >= 0.45 * 1200.0,
                "{a:?} below the scale range"
            );
        }
        let other = random_crop_box(
            40,
            30,
            (0.5, 1.0),
            (0.75, 4.0 / 3.0),
            &mut item_rng(3, 2, 0),
        );
        let first = random_crop_box(
            40,
            30,
            (0.5, 1.0),
            (0.75, 4.0 / 3.0),
            &mut item_rng(3, 1, 0),
        );
        let again = random_crop_box(
            40,
            30,
            (0.5, 1.0),
            (0.75, 4.0 / 3.0),
            &mut item_rng(3, 3, 0),
        );
        assert!(
            other != first || again != first,
            "epochs must draw different crops"
        );
    }

    #[test]
    fn decode_cache_shrinks_once_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("big.png");
        let img = RgbImage::from_fn(50, 30, |x, y| image::Rgb([x as u8 * 5, y as u8 * 8, 7]));
        img.save(&source).unwrap();
        let cache = DecodeCache {
            dir: dir.path().join("cache"),
            shorter_side: 12,
            filter: Interpolation::Bicubic,
        };
        let first = cache.load(3, &source).unwrap();
        assert_eq!(first.dimensions(), (20, 12));
        // The second load reads the raw file, even with the source gone.
        std::fs::remove_file(&source).unwrap();
        assert_eq!(cache.load(3, &source).unwrap(), first);
        // Within the bound: the decoded pixels, untouched.
        img.save(&source).unwrap();
        let wide = DecodeCache {
            dir: dir.path().join("cache2"),
            shorter_side: 30,
            ..cache.clone()
        };
        assert_eq!(wide.load(0, &source).unwrap(), img);
    }

    #[test]
    fn center_crop_keeps_the_middle_at_the_scaled_size() {
        // 80x40 with a bright 8px-wide column in the middle; size 16, crop_pct 0.5: the shorter
        // side goes to 32 (64x32), then the central 16x16 is cut out.
        let img = RgbImage::from_fn(80, 40, |x, _| {
            let v = if (36..44).contains(&x) { 255 } else { 0 };
            image::Rgb([v, v, v])
        });
        let out = EvalResize::CenterCrop { crop_pct: 0.5 }.apply(&img, 16, Interpolation::Bilinear);
        assert_eq!(out.dimensions(), (16, 16));
        // The bright column (3.2 px wide at this scale) sits at the centre, the edges stay dark.
        assert!(out.get_pixel(8, 8)[0] > 200, "{:?}", out.get_pixel(8, 8));
        assert_eq!(out.get_pixel(0, 8)[0], 0);
        assert_eq!(out.get_pixel(15, 8)[0], 0);
        let square = EvalResize::Square.apply(&img, 16, Interpolation::Bilinear);
        assert_eq!(square.dimensions(), (16, 16));
    }

    #[test]
    fn normalisation_maps_pixels_through_mean_and_std() {
        let img = RgbImage::from_pixel(2, 2, image::Rgb([255, 0, 128]));
        let mut out = ndarray::Array3::<f32>::zeros((3, 2, 2));
        normalise_into(&img, IMAGENET_MEAN, IMAGENET_STD, out.view_mut());
        assert!((out[[0, 1, 1]] - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((out[[1, 0, 0]] - (0.0 - 0.456) / 0.224).abs() < 1e-6);
        assert!((out[[2, 0, 1]] - (128.0 / 255.0 - 0.406) / 0.225).abs() < 1e-6);
    }
}
