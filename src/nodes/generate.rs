//! generate: prompts -> images with Stable Diffusion (`models::sd::pipeline`).
//!
//! Every image has its own seed, derived from the experiment seed, the prompt id and the image's
//! index, so an image does not depend on the order, batch or shard that produced it. Finished
//! images are written (temp file, sync, rename) before their journal records, and the final
//! `manifest.csv` is built from the journal sorted by id, so a resumed run is byte-identical to
//! an uninterrupted one.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use image::ImageEncoder;
use serde::{Deserialize, Serialize};

use super::{
    ArtifactType, InputSlot, ModelSlot, NodeError, NodeKind, ParamError, RunContext, RunSummary,
};
use crate::data::table::write_csv;
use crate::models::sd::pipeline::{Pipeline, Request, RgbImage, Settings};
use crate::models::sd::schedulers::SchedulerKind;
use crate::runtime::{Provider, SessionConfig, TensorRtOptions};

pub struct Generate;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Png,
    Jpeg,
}

impl ImageFormat {
    fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateParams {
    #[serde(default = "default_scheduler")]
    pub scheduler: SchedulerKind,
    #[serde(default = "default_steps", deserialize_with = "positive_steps")]
    pub steps: usize,
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    /// Image width; `None` takes the model's default (UNet sample size x VAE scale factor).
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    #[serde(default = "one")]
    pub images_per_prompt: usize,
    #[serde(default = "default_format")]
    pub format: ImageFormat,
    #[serde(default = "default_jpeg_quality")]
    pub jpeg_quality: u8,
    /// Images per UNet batch: speed only (each image has its own noise generator).
    #[serde(default = "one")]
    pub batch_size: usize,
}

fn default_scheduler() -> SchedulerKind {
    SchedulerKind::Pndm
}
fn default_steps() -> usize {
    50
}
fn default_guidance() -> f64 {
    7.5
}
fn one() -> usize {
    1
}
fn default_format() -> ImageFormat {
    ImageFormat::Png
}
fn default_jpeg_quality() -> u8 {
    95
}

fn positive_steps<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    let steps = usize::deserialize(deserializer)?;
    if steps == 0 {
        return Err(serde::de::Error::custom(
            "steps must be at least 1 (the number of denoising steps)",
        ));
    }
    Ok(steps)
}

const INPUTS: &[InputSlot] = &[InputSlot {
    name: "prompts",
    accepts: &[ArtifactType::Prompts],
    many: false,
    required: true,
}];

const MODELS: &[ModelSlot] = &[ModelSlot {
    name: "model",
    families: &["sd"],
}];

const MANIFEST_COLUMNS: &[&str] = &[
    "id",
    "path",
    "class",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "scheduler",
    "guidance",
    "size",
];

/// The seed of image `index` of prompt `item`: the first 8 bytes of
/// blake3(experiment seed (LE u64) || item id || index (LE u64)), little-endian.
pub fn image_seed(experiment_seed: u64, item: &str, index: u64) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&experiment_seed.to_le_bytes());
    hasher.update(item.as_bytes());
    hasher.update(&index.to_le_bytes());
    let hash = hasher.finalize();
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// One image to make, with everything its manifest row needs.
struct Job {
    id: String,
    path: String,
    class: String,
    prompt: String,
    negative_prompt: String,
    seed: u64,
}

impl NodeKind for Generate {
    fn name(&self) -> &'static str {
        "generate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn inputs(&self) -> &'static [InputSlot] {
        INPUTS
    }
    fn models(&self) -> &'static [ModelSlot] {
        MODELS
    }
    fn output(&self) -> ArtifactType {
        ArtifactType::Images
    }
    fn param_names(&self) -> &'static [&'static str] {
        &[
            "scheduler",
            "steps",
            "guidance",
            "width",
            "height",
            "images_per_prompt",
            "format",
            "jpeg_quality",
            "batch_size",
        ]
    }
    fn speed_only(&self) -> &'static [&'static str] {
        &["batch_size"]
    }
    fn seeded(&self) -> bool {
        true
    }
    fn journaled(&self) -> bool {
        true
    }
    fn resolve_params(&self, table: &toml::Table) -> Result<serde_json::Value, ParamError> {
        let value = super::resolve_typed::<GenerateParams>(table)?;
        let p: GenerateParams = serde_json::from_value(value.clone()).expect("round trip");
        let invalid = |key: &str, message: &str| ParamError {
            key: Some(key.to_string()),
            message: message.to_string(),
        };
        if p.images_per_prompt == 0 {
            return Err(invalid("images_per_prompt", "must be at least 1"));
        }
        if p.batch_size == 0 {
            return Err(invalid("batch_size", "must be at least 1"));
        }
        if !(1..=100).contains(&p.jpeg_quality) {
            return Err(invalid("jpeg_quality", "must be between 1 and 100"));
        }
        if !p.guidance.is_finite() {
            return Err(invalid("guidance", "must be a finite number"));
        }
        Ok(value)
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<RunSummary, NodeError> {
        let p: GenerateParams = ctx.params()?;
        let prompts = ctx.input("prompts")?.clone();
        let model = ctx
            .models
            .get("model")
            .cloned()
            .ok_or_else(|| NodeError::Failed("model slot `model` is empty".into()))?;
        let table = super::compose::read_source(prompts.ty, &prompts.dir)?;
        let column = |name: &str| {
            table
                .require(name)
                .map_err(|e| NodeError::Failed(e.to_string()))
        };
        let (id_col, class_col, prompt_col) = (column("id")?, column("class")?, column("prompt")?);
        let negative_col = table.column("negative_prompt");
        if table.rows.is_empty() {
            return Err(NodeError::Failed(format!(
                "node `{}`: {} has no prompts; nothing to generate",
                ctx.node,
                table.path.display()
            )));
        }

        let mut jobs = Vec::new();
        for row in &table.rows {
            let item = &row[id_col];
            let class = &row[class_col];
            if class.is_empty() || class.contains(['/', '\\']) || class == "." || class == ".." {
                return Err(NodeError::Failed(format!(
                    "{}: item {item:?} has class {class:?}, which cannot be a folder name",
                    table.path.display()
                )));
            }
            let stem = item.replace(['/', '\\'], "_");
            for k in 0..p.images_per_prompt {
                let path = format!("{class}/{stem}_{k}.{}", p.format.extension());
                jobs.push(Job {
                    id: format!("{class}/{stem}_{k}"),
                    path,
                    class: class.to_string(),
                    prompt: row[prompt_col].to_string(),
                    negative_prompt: negative_col.map(|c| row[c].to_string()).unwrap_or_default(),
                    seed: image_seed(ctx.seed, item, k as u64),
                });
            }
        }
        jobs.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(pair) = jobs.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(NodeError::Failed(format!(
                "{}: two prompts give the image id {:?}; prompt ids must be unique",
                table.path.display(),
                pair[0].id
            )));
        }

        let done = ctx.builder.journal_done("images")?;
        let already = jobs.iter().filter(|j| done.contains(&j.id)).count();
        let mut progress = ctx.progress(jobs.len() as u64, already as u64);
        // The model opens only when there is something to generate: a finaliser whose shards
        // did all the work needs no model (nor a GPU).
        let mut ready: Option<(Pipeline, Settings, String)> = None;
        ctx.for_each_todo(
            "images",
            &jobs,
            |j| &j.id,
            &done,
            |journal, todo| {
                // Only this part's temps: other shards may be writing theirs right now.
                remove_stale_temps(ctx.out, &todo)?;
                if ready.is_none() {
                    ready = Some(open_pipeline(ctx, &model, &p)?);
                }
                let (pipeline, settings, size) = ready.as_mut().expect("opened above");
                for batch in todo.chunks(p.batch_size) {
                    let requests: Vec<Request> = batch
                        .iter()
                        .map(|j| Request {
                            prompt: j.prompt.clone(),
                            // An empty negative prompt is diffusers' default "" either way.
                            negative_prompt: Some(j.negative_prompt.clone()),
                            seed: j.seed,
                        })
                        .collect();
                    let images = pipeline
                        .generate(settings, &requests)
                        .map_err(|e| NodeError::Failed(format!("node `{}`: {e}", ctx.node)))?;
                    let mut records = Vec::with_capacity(batch.len());
                    for (job, image) in batch.iter().zip(&images) {
                        write_image(&ctx.out.join(&job.path), image, &p)?;
                        records.push(serde_json::json!({
                            "item": job.id,
                            "path": job.path,
                            "class": job.class,
                            "prompt": job.prompt,
                            "negative_prompt": job.negative_prompt,
                            "seed": job.seed.to_string(),
                            "steps": settings.steps.to_string(),
                            "scheduler": settings.scheduler.name(),
                            "guidance": p.guidance.to_string(),
                            "size": size,
                        }));
                    }
                    let mut dirs: Vec<&str> = batch.iter().map(|j| j.class.as_str()).collect();
                    dirs.dedup();
                    for dir in dirs {
                        sync_dir(&ctx.out.join(dir))?;
                    }
                    journal.append_batch(&records)?;
                    progress.advance(records.len() as u64);
                }
                Ok(())
            },
        )?;
        if ctx.is_shard_worker() {
            return Ok(RunSummary::default());
        }

        // The manifest comes from the journal alone, so a resumed run writes the same bytes.
        let mut rows: BTreeMap<String, Vec<String>> = BTreeMap::new();
        // All journals count: the node's own and those of its shards, whatever the split.
        for record in ctx.builder.journal_records("images")? {
            let field = |name: &str| record[name].as_str().unwrap_or_default().to_string();
            let mut row = vec![field("item")];
            row.extend(MANIFEST_COLUMNS[1..].iter().map(|c| field(c)));
            rows.insert(field("item"), row);
        }
        write_csv(
            &ctx.out.join("manifest.csv"),
            MANIFEST_COLUMNS,
            rows.values(),
        )
        .map_err(|e| NodeError::Failed(e.to_string()))?;
        let mut summary = RunSummary::default();
        summary.counts.insert("images".into(), rows.len() as u64);
        summary
            .counts
            .insert("prompts".into(), table.rows.len() as u64);
        Ok(summary)
    }
}

/// Opens the pipeline on the run's device and fixes the image settings.
fn open_pipeline(
    ctx: &RunContext<'_>,
    model: &super::ModelInput,
    p: &GenerateParams,
) -> Result<(Pipeline, Settings, String), NodeError> {
    let provider: Provider = ctx
        .settings
        .provider
        .parse()
        .map_err(|e: crate::runtime::RuntimeError| NodeError::Failed(e.to_string()))?;
    let model_dir = crate::runtime::ModelDir::open(&model.dir, None)
        .map_err(|e| NodeError::Failed(format!("model `{}`: {e}", model.name)))?;
    let session = SessionConfig {
        intra_threads: (ctx.settings.threads > 0).then_some(ctx.settings.threads),
        tensorrt: TensorRtOptions::for_model(ctx.settings.engine_cache.as_deref(), &model_dir),
        ..SessionConfig::with_provider(provider)
    };
    let pipeline = Pipeline::open(&model.dir, &session)
        .map_err(|e| NodeError::Failed(format!("model `{}`: {e}", model.name)))?;
    let (default_width, default_height) = pipeline.default_size();
    let settings = Settings {
        scheduler: p.scheduler,
        steps: p.steps,
        guidance: p.guidance as f32,
        width: p.width.unwrap_or(default_width),
        height: p.height.unwrap_or(default_height),
    };
    pipeline
        .check_size(settings.width, settings.height)
        .map_err(|e| NodeError::Failed(format!("node `{}`: {e}", ctx.node)))?;

    let size = format!("{}x{}", settings.width, settings.height);
    Ok((pipeline, settings, size))
}

/// A kill during an image write can leave its temp file; a resumed run rewrites that image.
fn remove_stale_temps(out: &Path, jobs: &[&Job]) -> Result<(), NodeError> {
    for job in jobs {
        let temp = out.join(&job.path).with_extension("tmp");
        if temp.exists() {
            fs::remove_file(&temp).map_err(NodeError::io(&temp))?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), NodeError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(NodeError::io(dir))
}

/// Encodes the image and makes it durable under its final name (temp file, sync, rename), so a
/// journal record never points at a half-written file.
fn write_image(path: &Path, image: &RgbImage, p: &GenerateParams) -> Result<(), NodeError> {
    let bytes = encode(image, p.format, p.jpeg_quality).map_err(|e| NodeError::File {
        path: path.to_path_buf(),
        message: format!("cannot encode the image: {e}"),
    })?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(NodeError::io(parent))?;
    }
    let temp = path.with_extension("tmp");
    let mut file = File::create(&temp).map_err(NodeError::io(&temp))?;
    file.write_all(&bytes)
        .and_then(|_| file.sync_all())
        .map_err(NodeError::io(&temp))?;
    fs::rename(&temp, path).map_err(NodeError::io(path))
}

/// PNG or JPEG bytes of an image.
pub fn encode(
    image: &RgbImage,
    format: ImageFormat,
    jpeg_quality: u8,
) -> image::ImageResult<Vec<u8>> {
    let mut bytes = Vec::new();
    let cursor = std::io::Cursor::new(&mut bytes);
    let (w, h) = (image.width as u32, image.height as u32);
    match format {
        ImageFormat::Png => image::codecs::png::PngEncoder::new(cursor).write_image(
            &image.pixels,
            w,
            h,
            image::ExtendedColorType::Rgb8,
        )?,
        ImageFormat::Jpeg => image::codecs::jpeg::JpegEncoder::new_with_quality(
            cursor,
            jpeg_quality,
        )
        .write_image(&image.pixels, w, h, image::ExtendedColorType::Rgb8)?,
    }
    Ok(bytes)
}

/// `cip generate`: one image from one prompt, outside any experiment (for trying a model).
pub mod cli {
    use std::path::PathBuf;

    use thiserror::Error;

    use super::{encode, ImageFormat};
    use crate::models::sd::pipeline::{Pipeline, PipelineError, Request, Settings};
    use crate::models::sd::schedulers::SchedulerKind;
    use crate::runtime::{Provider, SessionConfig, TensorRtOptions};

    #[derive(Debug, clap::Args)]
    pub struct GenerateArgs {
        /// An `sd` model directory (cip-model.toml, optimum ONNX layout).
        #[arg(long, value_name = "DIR")]
        pub model: PathBuf,
        #[arg(long)]
        pub prompt: String,
        /// The unconditional text of classifier-free guidance [default: ""].
        #[arg(long)]
        pub negative_prompt: Option<String>,
        /// Seed of torch's CPU generator: the image equals diffusers' for this seed.
        #[arg(long, default_value_t = 0)]
        pub seed: u64,
        #[arg(long, default_value_t = 50)]
        pub steps: usize,
        /// pndm, ddim, dpm++2m, dpm++2m-karras, euler or euler-a.
        #[arg(long, default_value = "pndm")]
        pub scheduler: SchedulerKind,
        #[arg(long, default_value_t = 7.5)]
        pub guidance: f32,
        /// WIDTHxHEIGHT [default: the model's, e.g. 512x512 for SD-1.5].
        #[arg(long, value_name = "WxH", value_parser = parse_size)]
        pub size: Option<(usize, usize)>,
        /// Output file; `.jpg`/`.jpeg` writes JPEG (quality 95), anything else PNG.
        #[arg(long, value_name = "FILE")]
        pub out: PathBuf,
        /// cpu, cuda:N or tensorrt:N.
        #[arg(long, default_value = "cpu")]
        pub provider: Provider,
        /// Threads per operator [default: one per physical core].
        #[arg(long)]
        pub threads: Option<usize>,
        /// TensorRT engine cache root (engines are kept per model under it) [default:
        /// $CIP_CACHE/.tensorrt, else .cip/cache/.tensorrt].
        #[arg(long, value_name = "DIR")]
        pub engine_cache: Option<PathBuf>,
    }

    fn parse_size(text: &str) -> Result<(usize, usize), String> {
        let (w, h) = text
            .split_once(['x', 'X'])
            .ok_or_else(|| format!("size {text:?} must be WIDTHxHEIGHT, e.g. 512x512"))?;
        let number = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("size {text:?}: {s:?} is not a whole number of pixels"))
        };
        Ok((number(w)?, number(h)?))
    }

    #[derive(Debug, Error)]
    pub enum GenerateCliError {
        #[error(transparent)]
        Pipeline(#[from] PipelineError),
        #[error("{path}: cannot write the image: {message}")]
        Write { path: PathBuf, message: String },
    }

    pub fn run(args: GenerateArgs) -> Result<(), GenerateCliError> {
        let engine_root = args.engine_cache.clone().unwrap_or_else(|| {
            std::env::var_os("CIP_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(".cip/cache"))
                .join(".tensorrt")
        });
        let model_dir = crate::runtime::ModelDir::open(&args.model, None)
            .map_err(|e| GenerateCliError::Pipeline(e.into()))?;
        let session = SessionConfig {
            intra_threads: args.threads,
            tensorrt: TensorRtOptions::for_model(Some(&engine_root), &model_dir),
            ..SessionConfig::with_provider(args.provider)
        };
        let mut pipeline = Pipeline::open(&args.model, &session)?;
        let (width, height) = args.size.unwrap_or_else(|| pipeline.default_size());
        let settings = Settings {
            scheduler: args.scheduler,
            steps: args.steps,
            guidance: args.guidance,
            width,
            height,
        };
        let request = Request {
            prompt: args.prompt,
            negative_prompt: args.negative_prompt,
            seed: args.seed,
        };
        let image = pipeline.generate(&settings, &[request])?.remove(0);
        let jpeg = args
            .out
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"));
        let format = if jpeg {
            ImageFormat::Jpeg
        } else {
            ImageFormat::Png
        };
        let write_error = |message: String| GenerateCliError::Write {
            path: args.out.clone(),
            message,
        };
        let bytes = encode(&image, format, 95).map_err(|e| write_error(e.to_string()))?;
        std::fs::write(&args.out, bytes).map_err(|e| write_error(e.to_string()))?;
        Ok(())
    }
}
