//! Image preprocessing as the captioners' Hugging Face processors do it (transformers 5,
//! torchvision backend): RGB conversion as Pillow does it, antialiased resize with Pillow's
//! separable filters (torchvision's `antialias=True` is a port of them), rounding to uint8, then
//! `(x - 255 * mean) / (255 * std)` in float32.

use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader};
use serde::Deserialize;

/// The image-processor facts of a captioner's `[config]`.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageSettings {
    pub image_height: usize,
    pub image_width: usize,
    /// `bicubic` or `bilinear`.
    pub resample: String,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: Vec<f64>,
    pub image_std: Vec<f64>,
    /// `transformers_convert_to_rgb` (alpha over white) or `pillow_convert_rgb` (alpha dropped).
    pub rgb_conversion: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("{path}: cannot read the image: {message}")]
    Unreadable { path: String, message: String },
    #[error("unknown resample `{0}` (expected bicubic or bilinear)")]
    Resample(String),
}

/// An 8-bit RGB image, rows of `width * 3` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Pillow's `(a + 127) / 255`-style exact divide used by its blending code.
fn shift_div255(a: u32) -> u32 {
    ((a >> 8) + a) >> 8
}

/// Pillow's `alpha_composite` of `(r, g, b, a)` over opaque white, as transformers'
/// `convert_to_rgb` does it.
fn over_white(c: [u8; 4]) -> [u8; 3] {
    let src_a = c[3] as u32;
    if src_a == 0 {
        return [255, 255, 255];
    }
    let blend = 255 * (255 - src_a);
    let outa255 = src_a * 255 + blend;
    let coef1 = src_a * 255 * 255 * (1 << 7) / outa255;
    let coef2 = 255 * (1 << 7) - coef1;
    let mut out = [0u8; 3];
    for i in 0..3 {
        let tmp = c[i] as u32 * coef1 + 255 * coef2;
        out[i] = (shift_div255(tmp + (0x80 << 7)) >> 7) as u8;
    }
    out
}

/// Decodes `path` and converts it to RGB per `rgb_conversion`. 16-bit RGB keeps the high byte and
/// 16-bit grayscale is clipped at 255, as Pillow opens and converts them.
pub fn load_rgb(path: &Path, rgb_conversion: &str) -> Result<Rgb8, PreprocessError> {
    let unreadable = |message: String| PreprocessError::Unreadable {
        path: path.display().to_string(),
        message: message.trim().to_string(),
    };
    let reader = ImageReader::open(path)
        .map_err(|e| unreadable(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| unreadable(e.to_string()))?;
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| unreadable(e.to_string()))?;
    // Orientation is not applied: transformers' processors ignore EXIF orientation too.
    let _ = decoder.orientation();
    let image = DynamicImage::from_decoder(decoder).map_err(|e| unreadable(e.to_string()))?;
    let (width, height) = (image.width() as usize, image.height() as usize);
    let white = rgb_conversion == "transformers_convert_to_rgb";
    let data: Vec<u8> = match &image {
        DynamicImage::ImageRgb8(i) => i.as_raw().clone(),
        DynamicImage::ImageLuma8(i) => i.as_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLuma16(i) => i
            .as_raw()
            .iter()
            .flat_map(|&v| {
                let v = v.min(255) as u8;
                [v, v, v]
            })
            .collect(),
        DynamicImage::ImageRgb16(i) => i.as_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba8(i) => i
            .as_raw()
            .chunks_exact(4)
            .flat_map(|c| {
                if white {
                    over_white([c[0], c[1], c[2], c[3]])
                } else {
                    [c[0], c[1], c[2]]
                }
            })
            .collect(),
        DynamicImage::ImageLumaA8(i) => i
            .as_raw()
            .chunks_exact(2)
            .flat_map(|c| {
                if white {
                    over_white([c[0], c[0], c[0], c[1]])
                } else {
                    [c[0], c[0], c[0]]
                }
            })
            .collect(),
        other => {
            let rgba = other.to_rgba8();
            rgba.as_raw()
                .chunks_exact(4)
                .flat_map(|c| {
                    if white && c[3] != 255 {
                        over_white([c[0], c[1], c[2], c[3]])
                    } else {
                        [c[0], c[1], c[2]]
                    }
                })
                .collect()
        }
    };
    Ok(Rgb8 {
        width,
        height,
        data,
    })
}

fn bicubic(x: f64) -> f64 {
    // a = -0.5, as Pillow and torch's antialiased bicubic.
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs`: per output index, the first input index and normalised weights.
fn coefficients(
    input: usize,
    output: usize,
    filter: fn(f64) -> f64,
    support: f64,
) -> Vec<(usize, Vec<f64>)> {
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let support = support * filter_scale;
    (0..output)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let mut weights: Vec<f64> = (xmin..xmax)
                .map(|x| filter((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            (xmin, weights)
        })
        .collect()
}

/// Antialiased separable resize of an RGB image to `width x height`, float result per channel
/// (CHW) before rounding.
fn resize_float(
    image: &Rgb8,
    width: usize,
    height: usize,
    resample: &str,
) -> Result<Vec<f64>, PreprocessError> {
    let (filter, support): (fn(f64) -> f64, f64) = match resample {
        "bicubic" => (bicubic, 2.0),
        "bilinear" => (triangle, 1.0),
        other => return Err(PreprocessError::Resample(other.to_string())),
    };
    let horizontal = coefficients(image.width, width, filter, support);
    let vertical = coefficients(image.height, height, filter, support);
    let mut out = vec![0.0; 3 * width * height];
    for c in 0..3 {
        // Horizontal pass: [in_h, width].
        let mut rows = vec![0.0; image.height * width];
        for y in 0..image.height {
            for (x, (start, weights)) in horizontal.iter().enumerate() {
                rows[y * width + x] = weights
                    .iter()
                    .enumerate()
                    .map(|(k, w)| w * image.data[(y * image.width + start + k) * 3 + c] as f64)
                    .sum::<f64>()
                    // The uint8 kernels (Pillow's and torch's) store the first pass as uint8.
                    .round()
                    .clamp(0.0, 255.0);
            }
        }
        for (y, (start, weights)) in vertical.iter().enumerate() {
            for x in 0..width {
                out[(c * height + y) * width + x] = weights
                    .iter()
                    .enumerate()
                    .map(|(k, w)| w * rows[(start + k) * width + x])
                    .sum();
            }
        }
    }
    Ok(out)
}

/// The processor's `pixel_values` of one image: `[3, H, W]` float32.
pub fn pixel_values(image: &Rgb8, settings: &ImageSettings) -> Result<Vec<f32>, PreprocessError> {
    let (width, height) = if settings.do_resize {
        (settings.image_width, settings.image_height)
    } else {
        (image.width, image.height)
    };
    let resized: Vec<f32> = if settings.do_resize && (width, height) != (image.width, image.height)
    {
        resize_float(image, width, height, &settings.resample)?
            .into_iter()
            .map(|v| v.round().clamp(0.0, 255.0) as f32)
            .collect()
    } else {
        let mut chw = vec![0.0; 3 * width * height];
        for (i, px) in image.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * width * height + i] = px[c] as f32;
            }
        }
        chw
    };
    let plane = width * height;
    Ok(resized
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = i / plane;
            match (settings.do_rescale, settings.do_normalize) {
                // torchvision backend fuses rescale and normalise.
                (true, true) => {
                    let scale = 1.0 / settings.rescale_factor;
                    let mean = (scale * settings.image_mean[c]) as f32;
                    let std = (scale * settings.image_std[c]) as f32;
                    (v - mean) / std
                }
                (true, false) => v * settings.rescale_factor as f32,
                (false, true) => (v - settings.image_mean[c] as f32) / settings.image_std[c] as f32,
                (false, false) => v,
            }
        })
        .collect())
}
