//! `cip bench generate`: cip's Stable Diffusion pipeline against diffusers' StableDiffusionPipeline
//! on the full-size SD-1.5 architecture (random weights), in one run.
//!
//! The export tool builds and exports the model once into `<dir>/source` (diffusers'
//! `save_pretrained` layout, what diffusers loads) and `<dir>/model` (the cip model directory, what
//! cip loads); later runs reuse both. diffusers is timed first in a Python child process, which
//! exits and frees its memory before cip opens its sessions: both copies of SD-1.5 at once would
//! need about 10 GB.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{median, run_reference, BenchError, PythonTool};
use crate::models::sd::pipeline::{GraphSeconds, Pipeline, Request, Settings};
use crate::models::sd::schedulers::SchedulerKind;
use crate::runtime::SessionConfig;

/// What to run; the defaults are the comparison (PNDM, 4 steps, guidance 7.5, 128x128).
#[derive(Debug, Clone)]
pub struct GenerateBench {
    /// Cache of the benchmark model (`source/`, `model/`).
    pub dir: PathBuf,
    /// The cip model directory to time, if not `<dir>/model` (e.g. an optimised variant).
    pub model: Option<PathBuf>,
    pub prompt: String,
    pub steps: usize,
    pub guidance: f32,
    pub size: usize,
    pub seed: u64,
    /// Threads for both sides: torch.set_num_threads and ONNX Runtime's intra-op pool.
    pub threads: usize,
    pub repeats: usize,
    pub warmup: usize,
    /// Write ONNX Runtime's operator profile with this file prefix.
    pub profile: Option<PathBuf>,
    /// Time the reference library too (off: cip alone, e.g. for a profile).
    pub reference: bool,
}

/// Seconds per image for each side, and cip's split over its graphs (summed over timed runs).
#[derive(Debug, Clone)]
pub struct GenerateResult {
    pub reference: Vec<f64>,
    pub reference_label: String,
    pub cip: Vec<f64>,
    pub graphs: GraphSeconds,
    pub profile_files: Vec<PathBuf>,
    pub model: PathBuf,
}

impl GenerateResult {
    /// diffusers' median time over cip's: how many times faster cip is.
    pub fn ratio(&self) -> f64 {
        median(&self.reference) / median(&self.cip)
    }
}

impl std::fmt::Display for GenerateResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let runs = self.cip.len() as f64;
        let g = &self.graphs;
        if !self.reference.is_empty() {
            writeln!(
                f,
                "{}: {:.2} s/image (median of {})",
                self.reference_label,
                median(&self.reference),
                self.reference.len()
            )?;
        }
        writeln!(
            f,
            "cip ({}): {:.2} s/image (median of {})",
            self.model.display(),
            median(&self.cip),
            self.cip.len()
        )?;
        writeln!(
            f,
            "cip per image: text encoder {:.2} s, unet {:.2} s ({} calls, {:.2} s each), vae decoder {:.2} s",
            g.text_encoder / runs,
            g.unet / runs,
            g.unet_calls as f64 / runs,
            g.unet / g.unet_calls.max(1) as f64,
            g.vae_decoder / runs
        )?;
        for file in &self.profile_files {
            writeln!(f, "ONNX Runtime profile: {}", file.display())?;
        }
        if self.reference.is_empty() {
            return Ok(());
        }
        write!(f, "ratio: cip is {:.2}x diffusers", self.ratio())
    }
}

/// Prepares the model if needed, times diffusers, then cip.
pub fn run(bench: &GenerateBench, python: &PythonTool) -> Result<GenerateResult, BenchError> {
    let model = bench
        .model
        .clone()
        .unwrap_or_else(|| bench.dir.join("model"));
    if !bench.dir.join("source/model_index.json").is_file()
        || !bench.dir.join("model/cip-model.toml").is_file()
    {
        eprintln!(
            "preparing the SD-1.5 benchmark model in {} (once; takes minutes)",
            bench.dir.display()
        );
        python.run(&["sd15-prepare", "--dir", &bench.dir.display().to_string()])?;
    }

    let threads = bench.threads.to_string();
    let size = bench.size.to_string();
    let steps = bench.steps.to_string();
    let guidance = bench.guidance.to_string();
    let seed = bench.seed.to_string();
    let repeats = bench.repeats.to_string();
    let warmup = bench.warmup.to_string();
    let dir = bench.dir.display().to_string();
    let (reference, reference_label) = if !bench.reference {
        (Vec::new(), "diffusers (not run)".to_string())
    } else {
        run_reference(
            python,
            &[
                "sd15-time",
                "--dir",
                &dir,
                "--prompt",
                &bench.prompt,
                "--steps",
                &steps,
                "--guidance",
                &guidance,
                "--size",
                &size,
                "--seed",
                &seed,
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
    let failed = |e: crate::models::sd::pipeline::PipelineError| {
        BenchError::Failed(format!("cip on {}: {e}", model.display()))
    };
    let mut pipeline = Pipeline::open(&model, &session).map_err(failed)?;
    let settings = Settings {
        scheduler: SchedulerKind::Pndm,
        steps: bench.steps,
        guidance: bench.guidance,
        width: bench.size,
        height: bench.size,
    };
    let request = Request {
        prompt: bench.prompt.clone(),
        negative_prompt: None,
        seed: bench.seed,
    };
    let mut cip = Vec::new();
    for i in 0..bench.warmup + bench.repeats {
        if i == bench.warmup {
            pipeline.take_graph_seconds();
        }
        let started = Instant::now();
        pipeline
            .generate(&settings, std::slice::from_ref(&request))
            .map_err(failed)?;
        if i >= bench.warmup {
            cip.push(started.elapsed().as_secs_f64());
        }
    }
    let graphs = pipeline.take_graph_seconds();
    let profile_files = if bench.profile.is_some() {
        pipeline.end_profiling().map_err(failed)?
    } else {
        Vec::new()
    };
    Ok(GenerateResult {
        reference,
        reference_label,
        cip,
        graphs,
        profile_files,
        model,
    })
}

/// The default cache of benchmark models: `.cip/bench` under the current directory.
pub fn default_dir(name: &str) -> PathBuf {
    Path::new(".cip").join("bench").join(name)
}
