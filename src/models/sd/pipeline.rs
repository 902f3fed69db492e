//! Stable Diffusion text-to-image on ONNX Runtime, step for step as diffusers'
//! `StableDiffusionPipeline`: CLIP tokenizer and text encoder, a UNet loop with classifier-free
//! guidance, one of cip's diffusers-equal schedulers, and the VAE decoder.
//!
//! Noise comes from [`TorchGenerator`] (torch's CPU generator), one per image, so an image for a
//! seed equals diffusers' image for `torch.Generator().manual_seed(seed)` and does not depend on
//! which other images share its batch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use serde::Deserialize;
use thiserror::Error;
use tokenizers::Tokenizer;

use super::noise::TorchGenerator;
use super::schedulers::{build, SchedulerConfig, SchedulerError, SchedulerKind};
use crate::runtime::{Family, ModelDir, RuntimeError, SessionConfig};

#[derive(Debug, Error)]
pub enum PipelineError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error("{path}: cannot load the tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("cannot tokenize {prompt:?}: {message}")]
    Tokenize { prompt: String, message: String },
    #[error("{path}: {message}")]
    UnetConfig { path: PathBuf, message: String },
    #[error("ONNX Runtime failed in the {role} graph: {message}")]
    Inference { role: &'static str, message: String },
    #[error(
        "image size {width}x{height} is not a multiple of {multiple} (vae_scale_factor {vae} \
         x 2^(UNet levels - 1)) for this model; choose e.g. {suggestion}"
    )]
    Size {
        width: usize,
        height: usize,
        multiple: usize,
        vae: usize,
        suggestion: String,
    },
    #[error("steps must be at least 1, got 0")]
    ZeroSteps,
    #[error("no prompts to generate: the prompt list is empty")]
    NoPrompts,
}

/// The `[config]` keys of an `sd` model directory this pipeline reads.
#[derive(Debug, Clone, Deserialize)]
pub struct SdConfig {
    pub vae_scaling_factor: f32,
    pub vae_scale_factor: usize,
    pub latent_channels: usize,
    pub unet_sample_size: usize,
    pub text_max_length: usize,
    pub pad_token_id: u32,
    pub eos_token_id: u32,
}

/// What one batch of images shares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub scheduler: SchedulerKind,
    pub steps: usize,
    /// Classifier-free guidance scale; <= 1 runs the conditional branch alone, as diffusers does.
    pub guidance: f32,
    pub width: usize,
    pub height: usize,
}

/// One image to make.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    /// The unconditional text of CFG; `None` means `""`.
    pub negative_prompt: Option<String>,
    pub seed: u64,
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Seconds spent inside each graph's `run` since the last [`Pipeline::take_graph_seconds`]
/// (ONNX Runtime's own time plus input/output copies); for benchmarks and profiles.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GraphSeconds {
    pub text_encoder: f64,
    pub unet: f64,
    pub vae_decoder: f64,
    /// UNet calls counted in `unet`.
    pub unet_calls: usize,
}

pub struct Pipeline {
    dir: ModelDir,
    graph_seconds: GraphSeconds,
    config: SdConfig,
    unet_levels: u32,
    tokenizer: Tokenizer,
    scheduler_config: SchedulerConfig,
    text_encoder: Session,
    unet: Session,
    vae_decoder: Session,
    /// Float type of the UNet's and VAE's tensors (fp16 exports take and give float16).
    precision: Precision,
    /// Where the text embeddings stay between UNet calls: the GPU for CUDA / TensorRT, so that
    /// they cross the bus once per batch, not once per step.
    device: Option<u32>,
}

/// The float type of a graph's latent and embedding tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
}

impl Precision {
    fn of(dir: &ModelDir, role: &str, input: &str) -> Result<Precision, PipelineError> {
        let spec = dir.graph(role)?;
        match spec
            .inputs
            .iter()
            .find(|t| t.name == input)
            .map(|t| t.dtype.as_str())
        {
            Some("float16") => Ok(Precision::F16),
            _ => Ok(Precision::F32),
        }
    }

    /// An owned tensor of this float type from f32 data (fp16 rounds to nearest, as torch's cast).
    fn tensor(self, shape: Vec<i64>, data: Vec<f32>) -> ort::Result<DynValue> {
        Ok(match self {
            Precision::F32 => Tensor::from_array((shape, data))?.into_dyn(),
            Precision::F16 => Tensor::from_array((
                shape,
                data.into_iter()
                    .map(half::f16::from_f32)
                    .collect::<Vec<_>>(),
            ))?
            .into_dyn(),
        })
    }
}

/// A float tensor's shape and its values as f32, whichever float type the graph gave.
fn extract_f32(value: &DynValue) -> ort::Result<(Vec<usize>, Vec<f32>)> {
    if let Ok((shape, data)) = value.try_extract_tensor::<f32>() {
        return Ok((shape.iter().map(|&d| d as usize).collect(), data.to_vec()));
    }
    let (shape, data) = value.try_extract_tensor::<half::f16>()?;
    Ok((
        shape.iter().map(|&d| d as usize).collect(),
        data.iter().map(|x| x.to_f32()).collect(),
    ))
}

#[derive(Deserialize)]
struct UnetJson {
    block_out_channels: Vec<u32>,
}

fn inference(role: &'static str) -> impl Fn(ort::Error) -> PipelineError {
    move |e| PipelineError::Inference {
        role,
        message: e.to_string(),
    }
}

impl Pipeline {
    /// Opens an `sd` model directory with its three graphs on the given provider.
    pub fn open(root: &Path, session: &SessionConfig) -> Result<Pipeline, PipelineError> {
        let dir = ModelDir::open(root, Some(Family::Sd))?;
        let config: SdConfig = dir.config_as()?;
        let tokenizer_path = dir.path("tokenizer/tokenizer.json");
        let tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| PipelineError::Tokenizer {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;
        let unet_config_path = dir.path("unet/config.json");
        let unet_json: UnetJson = std::fs::read_to_string(&unet_config_path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
            .map_err(|message| PipelineError::UnetConfig {
                path: unet_config_path.clone(),
                message: format!("cannot read block_out_channels: {message}"),
            })?;
        let scheduler_config =
            SchedulerConfig::from_file(dir.path("scheduler/scheduler_config.json"))?;
        let text_encoder = dir.session("text_encoder", session)?;
        let unet = dir.session("unet", session)?;
        let vae_decoder = dir.session("vae_decoder", session)?;
        let precision = Precision::of(&dir, "unet", "sample")?;
        Ok(Pipeline {
            precision,
            device: session.provider.device(),
            config,
            unet_levels: unet_json.block_out_channels.len().max(1) as u32,
            tokenizer,
            scheduler_config,
            text_encoder,
            unet,
            vae_decoder,
            dir,
            graph_seconds: GraphSeconds::default(),
        })
    }

    /// Time spent per graph since the last call, and resets the counters.
    pub fn take_graph_seconds(&mut self) -> GraphSeconds {
        std::mem::take(&mut self.graph_seconds)
    }

    /// Ends ONNX Runtime profiling (sessions opened with `SessionConfig::profile`) and returns the
    /// profile files written, one per graph.
    pub fn end_profiling(&mut self) -> Result<Vec<PathBuf>, PipelineError> {
        let mut files = Vec::new();
        for (role, session) in [
            ("text_encoder", &mut self.text_encoder),
            ("unet", &mut self.unet),
            ("vae_decoder", &mut self.vae_decoder),
        ] {
            files.push(PathBuf::from(
                session.end_profiling().map_err(inference(role))?,
            ));
        }
        Ok(files)
    }

    pub fn model_dir(&self) -> &ModelDir {
        &self.dir
    }

    pub fn config(&self) -> &SdConfig {
        &self.config
    }

    /// diffusers' default size: the UNet's sample size times the VAE's scale factor.
    pub fn default_size(&self) -> (usize, usize) {
        let side = self.config.unet_sample_size * self.config.vae_scale_factor;
        (side, side)
    }

    /// What width and height must be multiples of.
    pub fn size_multiple(&self) -> usize {
        self.config.vae_scale_factor << (self.unet_levels - 1)
    }

    /// Rejects sizes the exported UNet cannot take (it has no path for odd skip sizes).
    pub fn check_size(&self, width: usize, height: usize) -> Result<(), PipelineError> {
        let multiple = self.size_multiple();
        if width == 0 || height == 0 || width % multiple != 0 || height % multiple != 0 {
            let round = |x: usize| (x.div_ceil(multiple)).max(1) * multiple;
            return Err(PipelineError::Size {
                width,
                height,
                multiple,
                vae: self.config.vae_scale_factor,
                suggestion: format!("{}x{}", round(width), round(height)),
            });
        }
        Ok(())
    }

    /// Token ids as diffusers' CLIP tokenizer call gives them: BOS, text, EOS, padded with
    /// `pad_token_id` to `text_max_length`; an over-long prompt keeps its first tokens and EOS.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>, PipelineError> {
        let max = self.config.text_max_length;
        let encoding =
            self.tokenizer
                .encode(prompt, true)
                .map_err(|e| PipelineError::Tokenize {
                    prompt: prompt.to_string(),
                    message: e.to_string(),
                })?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() > max {
            let removed = ids.len() - max;
            let dropped = self
                .tokenizer
                .decode(&ids[max - 1..ids.len() - 1], true)
                .unwrap_or_default();
            tracing::warn!(
                "the prompt is longer than the text encoder's {max} tokens; {removed} tokens were \
                 truncated: {dropped:?}"
            );
            ids.truncate(max - 1);
            ids.push(self.config.eos_token_id);
        }
        ids.resize(max, self.config.pad_token_id);
        Ok(ids)
    }

    /// Text embeddings `[n, S, hidden]` for the given prompts, as ONNX Runtime holds them: in the
    /// graph's float type, and on the GPU when the pipeline runs there.
    fn encode_text(&mut self, prompts: &[&str]) -> Result<DynValue, PipelineError> {
        let max = self.config.text_max_length;
        let mut ids = Vec::with_capacity(prompts.len() * max);
        for prompt in prompts {
            ids.extend(self.tokenize(prompt)?.into_iter().map(|id| id as i32));
        }
        let error = inference("text_encoder");
        let ids =
            Tensor::from_array((vec![prompts.len() as i64, max as i64], ids)).map_err(&error)?;
        let started = Instant::now();
        let hidden = match self.device {
            None => self
                .text_encoder
                .run(ort::inputs!["input_ids" => ids])
                .map_err(&error)?
                .remove("last_hidden_state"),
            Some(device) => {
                let mut binding = self.text_encoder.create_binding().map_err(&error)?;
                binding.bind_input("input_ids", &ids).map_err(&error)?;
                binding
                    .bind_output_to_device(
                        "last_hidden_state",
                        &gpu_memory(device).map_err(&error)?,
                    )
                    .map_err(&error)?;
                binding
                    .bind_output_to_device("pooler_output", &gpu_memory(device).map_err(&error)?)
                    .map_err(&error)?;
                // A fresh binding per call: its output buffer is never reused by a later run.
                let mut outputs = self.text_encoder.run_binding(&binding).map_err(&error)?;
                outputs.remove("last_hidden_state")
            }
        }
        .ok_or_else(|| PipelineError::Inference {
            role: "text_encoder",
            message: "no output `last_hidden_state`".into(),
        })?;
        self.graph_seconds.text_encoder += started.elapsed().as_secs_f64();
        Ok(hidden)
    }

    /// Makes one image per request, all in one UNet batch (two with CFG: `[uncond..., cond...]`).
    pub fn generate(
        &mut self,
        settings: &Settings,
        requests: &[Request],
    ) -> Result<Vec<RgbImage>, PipelineError> {
        if requests.is_empty() {
            return Err(PipelineError::NoPrompts);
        }
        if settings.steps == 0 {
            return Err(PipelineError::ZeroSteps);
        }
        self.check_size(settings.width, settings.height)?;
        let n = requests.len();
        let cfg = settings.guidance > 1.0;
        let mut texts: Vec<&str> = Vec::with_capacity(2 * n);
        if cfg {
            texts.extend(
                requests
                    .iter()
                    .map(|r| r.negative_prompt.as_deref().unwrap_or("")),
            );
        }
        texts.extend(requests.iter().map(|r| r.prompt.as_str()));
        let embeddings = self.encode_text(&texts)?;

        let mut scheduler = build(settings.scheduler, &self.scheduler_config)?;
        scheduler.set_timesteps(settings.steps)?;
        let channels = self.config.latent_channels;
        let latent_h = settings.height / self.config.vae_scale_factor;
        let latent_w = settings.width / self.config.vae_scale_factor;
        let per_image = channels * latent_h * latent_w;
        let mut generators: Vec<TorchGenerator> = requests
            .iter()
            .map(|r| TorchGenerator::new(r.seed))
            .collect();
        let sigma = scheduler.init_noise_sigma();
        let mut latents: Vec<f32> = Vec::with_capacity(n * per_image);
        for generator in &mut generators {
            let noise = generator.randn(&[1, channels, latent_h, latent_w]);
            latents.extend(noise.into_iter().map(|x| x * sigma));
        }

        let unet_batch = if cfg { 2 * n } else { n };
        let error = inference("unet");
        // One binding for the whole loop: the embeddings are bound once (no copy per step, and on
        // the GPU they stay there); sample and timestep are rebound each step; the output comes
        // back to host memory, where the scheduler runs.
        let mut binding = self.unet.create_binding().map_err(&error)?;
        binding
            .bind_input("encoder_hidden_states", &embeddings)
            .map_err(&error)?;
        let host = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(&error)?;
        binding
            .bind_output_to_device("out_sample", &host)
            .map_err(&error)?;
        let sample_shape = vec![
            unet_batch as i64,
            channels as i64,
            latent_h as i64,
            latent_w as i64,
        ];
        for step in 0..scheduler.model_calls() {
            let timestep = scheduler.timesteps()[step];
            let scaled = scheduler.scale_model_input(&latents, step)?;
            let mut sample = Vec::with_capacity(unet_batch * per_image);
            if cfg {
                sample.extend_from_slice(&scaled);
            }
            sample.extend_from_slice(&scaled);
            let sample = self
                .precision
                .tensor(sample_shape.clone(), sample)
                .map_err(&error)?;
            let timesteps =
                Tensor::from_array((vec![unet_batch as i64], vec![timestep; unet_batch]))
                    .map_err(&error)?;
            binding.bind_input("sample", &sample).map_err(&error)?;
            binding.bind_input("timestep", &timesteps).map_err(&error)?;
            let started = Instant::now();
            let outputs = self.unet.run_binding(&binding).map_err(&error)?;
            let (_, predicted) = extract_f32(&outputs["out_sample"]).map_err(&error)?;
            drop(outputs);
            self.graph_seconds.unet += started.elapsed().as_secs_f64();
            self.graph_seconds.unet_calls += 1;
            let noise_prediction: Vec<f32> = if cfg {
                let (uncond, cond) = predicted.split_at(n * per_image);
                uncond
                    .iter()
                    .zip(cond)
                    .map(|(&u, &c)| u + settings.guidance * (c - u))
                    .collect()
            } else {
                predicted
            };
            latents = scheduler.step(&noise_prediction, step, &latents, &mut generators)?;
        }

        let scaling = self.config.vae_scaling_factor;
        let latents: Vec<f32> = latents.into_iter().map(|x| x / scaling).collect();
        let error = inference("vae_decoder");
        let latents = self
            .precision
            .tensor(
                vec![n as i64, channels as i64, latent_h as i64, latent_w as i64],
                latents,
            )
            .map_err(&error)?;
        let started = Instant::now();
        let outputs = self
            .vae_decoder
            .run(ort::inputs!["latent_sample" => latents])
            .map_err(&error)?;
        let (shape, decoded) = extract_f32(&outputs["sample"]).map_err(&error)?;
        drop(outputs);
        self.graph_seconds.vae_decoder += started.elapsed().as_secs_f64();
        let (height, width) = (shape[2], shape[3]);
        let decoded =
            ndarray::ArrayView4::from_shape((shape[0], shape[1], height, width), &decoded)
                .expect("decoded shape");
        let mut images = Vec::with_capacity(n);
        for index in 0..n {
            let mut pixels = Vec::with_capacity(height * width * 3);
            for y in 0..height {
                for x in 0..width {
                    for c in 0..3 {
                        pixels.push(to_byte(decoded[[index, c, y, x]]));
                    }
                }
            }
            images.push(RgbImage {
                width,
                height,
                pixels,
            });
        }
        Ok(images)
    }
}

/// Device memory of CUDA GPU `device`, where ONNX Runtime's CUDA and TensorRT providers keep
/// tensors.
fn gpu_memory(device: u32) -> ort::Result<MemoryInfo<'static>> {
    MemoryInfo::new(
        AllocationDevice::CUDA,
        device as i32,
        AllocatorType::Device,
        MemoryType::Default,
    )
}

/// diffusers' postprocess: `(x / 2 + 0.5).clamp(0, 1)`, then `round(x * 255)` (in float32).
fn to_byte(x: f32) -> u8 {
    let unit = (x / 2.0 + 0.5).clamp(0.0, 1.0);
    (unit * 255.0).round_ties_even() as u8
}
