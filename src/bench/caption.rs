//! `cip bench caption`: cip's BLIP-2 captioner against transformers' `generate` on a BLIP-2 at
//! OPT-2.7b's real widths with fewer layers (random weights), batch 8, greedy, exactly 16 new
//! tokens (min_new_tokens = max_new_tokens), in one run.
//!
//! As for [`super::generate`], the export tool builds `<dir>/source` and `<dir>/model` once, and
//! transformers runs first in a child process that exits before cip loads the model.

use std::path::PathBuf;
use std::time::Instant;

use super::{median, run_reference, BenchError, PythonTool};
use crate::models::blip2::Blip2;
use crate::models::decoding::GenerateOptions;
use crate::runtime::SessionConfig;

#[derive(Debug, Clone)]
pub struct CaptionBench {
    pub dir: PathBuf,
    pub batch: usize,
    pub new_tokens: usize,
    pub threads: usize,
    pub repeats: usize,
    pub warmup: usize,
    pub profile: Option<PathBuf>,
    /// Time the reference library too (off: cip alone, e.g. for a profile).
    pub reference: bool,
}

#[derive(Debug, Clone)]
pub struct CaptionResult {
    pub batch: usize,
    pub reference: Vec<f64>,
    pub reference_label: String,
    pub cip: Vec<f64>,
    /// Seconds per batch in the vision graph and in decoding (embed + decoder + search).
    pub vision: f64,
    pub profile_files: Vec<PathBuf>,
}

impl CaptionResult {
    pub fn ratio(&self) -> f64 {
        median(&self.reference) / median(&self.cip)
    }
}

impl std::fmt::Display for CaptionResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per_second = |secs: &[f64]| self.batch as f64 / median(secs);
        if !self.reference.is_empty() {
            writeln!(
                f,
                "{}: {:.2} captions/s ({:.2} s/batch, median of {})",
                self.reference_label,
                per_second(&self.reference),
                median(&self.reference),
                self.reference.len()
            )?;
        }
        writeln!(
            f,
            "cip: {:.2} captions/s ({:.2} s/batch, median of {}; vision graph {:.2} s/batch)",
            per_second(&self.cip),
            median(&self.cip),
            self.cip.len(),
            self.vision
        )?;
        for file in &self.profile_files {
            writeln!(f, "ONNX Runtime profile: {}", file.display())?;
        }
        if self.reference.is_empty() {
            return Ok(());
        }
        write!(f, "ratio: cip is {:.2}x transformers", self.ratio())
    }
}

/// The same pixels as the Python side's `bench_pixels`: sin(i * 0.001) over the flat tensor.
fn bench_pixels(batch: usize, size: usize) -> Vec<f32> {
    (0..batch * 3 * size * size)
        .map(|i| (i as f64 * 0.001).sin() as f32)
        .collect()
}

pub fn run(bench: &CaptionBench, python: &PythonTool) -> Result<CaptionResult, BenchError> {
    let model = bench.dir.join("model");
    if !bench.dir.join("source/config.json").is_file() || !model.join("cip-model.toml").is_file() {
        eprintln!(
            "preparing the BLIP-2 benchmark model in {} (once; takes minutes)",
            bench.dir.display()
        );
        python.run(&["blip2-prepare", "--dir", &bench.dir.display().to_string()])?;
    }
    let dir = bench.dir.display().to_string();
    let batch = bench.batch.to_string();
    let tokens = bench.new_tokens.to_string();
    let threads = bench.threads.to_string();
    let repeats = bench.repeats.to_string();
    let warmup = bench.warmup.to_string();
    let (reference, reference_label) = if !bench.reference {
        (Vec::new(), "transformers (not run)".to_string())
    } else {
        run_reference(
            python,
            &[
                "blip2-time",
                "--dir",
                &dir,
                "--batch",
                &batch,
                "--new-tokens",
                &tokens,
                "--threads",
                &threads,
                "--repeats",
                &repeats,
                "--warmup",
                &warmup,
            ],
        )?
    };

    let session = SessionConfig {
        intra_threads: Some(bench.threads),
        profile: bench.profile.clone(),
        ..SessionConfig::default()
    };
    let failed = |e: crate::models::decoding::CaptionModelError| {
        BenchError::Failed(format!("cip on {}: {e}", model.display()))
    };
    let mut blip2 = Blip2::open(&model, &session).map_err(failed)?;
    let size = blip2.image.image_height;
    let pixels = bench_pixels(bench.batch, size);
    let options = GenerateOptions {
        max_new_tokens: bench.new_tokens,
        min_new_tokens: bench.new_tokens,
        ..GenerateOptions::default()
    };
    let mut cip = Vec::new();
    let mut vision = Vec::new();
    for i in 0..bench.warmup + bench.repeats {
        let started = Instant::now();
        blip2.query_embeds(&pixels, bench.batch).map_err(failed)?;
        let vision_secs = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let generated = blip2
            .generate(&pixels, bench.batch, None, &options)
            .map_err(failed)?;
        blip2.captions(&generated).map_err(failed)?;
        let secs = started.elapsed().as_secs_f64();
        let new = generated.new_ids();
        if new.iter().any(|ids| ids.len() != bench.new_tokens) {
            return Err(BenchError::Failed(format!(
                "cip generated {:?} new tokens per row, expected {} each",
                new.iter().map(Vec::len).collect::<Vec<_>>(),
                bench.new_tokens
            )));
        }
        if i >= bench.warmup {
            cip.push(secs);
            vision.push(vision_secs);
        }
    }
    let profile_files = if bench.profile.is_some() {
        blip2.end_profiling().map_err(failed)?
    } else {
        Vec::new()
    };
    Ok(CaptionResult {
        batch: bench.batch,
        reference,
        reference_label,
        cip,
        vision: median(&vision),
        profile_files,
    })
}
