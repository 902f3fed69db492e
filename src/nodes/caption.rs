//! `caption`: captions every image of an image set with a BLIP-2 or ViT-GPT2 model directory.
//! Output `captions.csv` (id, class, caption, tokens), sorted by id. Journaled per batch, so an
//! interrupted run resumes where it stopped; unreadable images are skipped (recorded and counted)
//! or fail the node, per `on_error`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{
    ArtifactType, InputSlot, ModelSlot, NodeError, NodeKind, ParamError, RunContext, RunSummary,
};
use crate::data::table::{write_csv, CsvTable};
use crate::models::blip2::Blip2;
use crate::models::decoding::{CaptionModelError, EarlyStopping, GenerateOptions, Generated};
use crate::models::preprocess::{load_rgb, pixel_values, ImageSettings};
use crate::models::vit_gpt2::VitGpt2;
use crate::runtime::{Provider, SessionConfig};

pub struct Caption;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    Skip,
    #[default]
    Fail,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionParams {
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "one")]
    pub num_beams: usize,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub min_new_tokens: usize,
    #[serde(default = "unit")]
    pub repetition_penalty: f32,
    #[serde(default)]
    pub no_repeat_ngram_size: usize,
    #[serde(default = "unit")]
    pub length_penalty: f32,
    #[serde(default)]
    pub early_stopping: EarlyStopping,
    #[serde(default)]
    pub on_error: OnError,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_max_new_tokens() -> usize {
    16
}
fn one() -> usize {
    1
}
fn unit() -> f32 {
    1.0
}
fn default_batch_size() -> usize {
    8
}

impl CaptionParams {
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            num_beams: self.num_beams.max(1),
            length_penalty: self.length_penalty,
            early_stopping: self.early_stopping,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
        }
    }
}

/// A captioner of either family.
pub enum Captioner {
    Blip2(Box<Blip2>),
    VitGpt2(Box<VitGpt2>),
}

/// One caption and its number of generated tokens (EOS and padding excluded).
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionText {
    pub caption: String,
    pub tokens: usize,
}

impl Captioner {
    pub fn open(
        family: &str,
        dir: &Path,
        session: &SessionConfig,
    ) -> Result<Captioner, CaptionModelError> {
        Ok(match family {
            "vit-gpt2" => Captioner::VitGpt2(Box::new(VitGpt2::open(dir, session)?)),
            _ => Captioner::Blip2(Box::new(Blip2::open(dir, session)?)),
        })
    }

    /// Opens `dir` as whichever captioner family its manifest declares.
    pub fn open_any(dir: &Path, session: &SessionConfig) -> Result<Captioner, CaptionModelError> {
        let manifest = crate::runtime::ModelDir::open(dir, None)?;
        match manifest.family() {
            crate::runtime::Family::VitGpt2 => Captioner::open("vit-gpt2", dir, session),
            crate::runtime::Family::Blip2 => Captioner::open("blip2", dir, session),
            other => Err(CaptionModelError::Unsupported {
                model: dir.display().to_string(),
                message: format!(
                    "is a `{other}` model directory; captioning needs family blip2 or vit-gpt2"
                ),
            }),
        }
    }

    pub fn image_settings(&self) -> &ImageSettings {
        match self {
            Captioner::Blip2(m) => &m.image,
            Captioner::VitGpt2(m) => &m.image,
        }
    }

    /// Captions a batch of preprocessed images (`[batch, 3, H, W]` flat).
    pub fn caption(
        &mut self,
        pixels: &[f32],
        batch: usize,
        prompt: Option<&str>,
        options: &GenerateOptions,
    ) -> Result<Vec<CaptionText>, CaptionModelError> {
        let (generated, captions, special): (Generated, Vec<String>, _) = match self {
            Captioner::Blip2(m) => {
                let prompts = prompt.map(|p| vec![p.to_string(); batch]);
                let g = m.generate(pixels, batch, prompts.as_deref(), options)?;
                let c = m.captions(&g)?;
                (g, c, m.special_tokens())
            }
            Captioner::VitGpt2(m) => {
                let g = m.generate(pixels, batch, prompt, options)?;
                let c = m.captions(&g)?;
                (g, c, m.special_tokens())
            }
        };
        Ok(generated
            .new_ids()
            .iter()
            .zip(captions)
            .map(|(ids, caption)| CaptionText {
                caption,
                tokens: ids
                    .iter()
                    .take_while(|t| !special.eos.contains(t))
                    .filter(|&&t| t != special.pad)
                    .count(),
            })
            .collect())
    }
}

/// An image to caption.
#[derive(Debug, Clone)]
struct Item {
    id: String,
    class: String,
    path: PathBuf,
}

/// The images of an artifact: `manifest.csv` (id, path, class) when present, else ImageFolder.
fn list_images(dir: &Path) -> Result<Vec<Item>, NodeError> {
    let manifest = dir.join("manifest.csv");
    let invalid = |e: crate::data::DataError| NodeError::Failed(e.to_string());
    let mut items = if manifest.is_file() {
        let table = CsvTable::read(&manifest).map_err(invalid)?;
        let (id, path, class) = (
            table.require("id").map_err(invalid)?,
            table.require("path").map_err(invalid)?,
            table.require("class").map_err(invalid)?,
        );
        table
            .rows
            .iter()
            .map(|r| Item {
                id: r[id].to_string(),
                class: r[class].to_string(),
                path: dir.join(&r[path]),
            })
            .collect::<Vec<_>>()
    } else {
        crate::data::imagefolder::scan(dir)
            .map_err(invalid)?
            .into_iter()
            .map(|i| Item {
                path: dir.join(&i.path),
                id: i.id,
                class: i.class,
            })
            .collect()
    };
    items.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(items)
}

fn session_config(ctx: &RunContext<'_>, model: &Path) -> Result<SessionConfig, NodeError> {
    let provider: Provider = ctx
        .settings
        .provider
        .parse()
        .map_err(|e: crate::runtime::RuntimeError| NodeError::Failed(e.to_string()))?;
    let dir = crate::runtime::ModelDir::open(model, None)
        .map_err(|e| NodeError::Failed(CaptionModelError::from(e).to_string()))?;
    Ok(SessionConfig {
        provider,
        intra_threads: (ctx.settings.threads > 0).then_some(ctx.settings.threads),
        tensorrt: crate::runtime::TensorRtOptions::for_model(
            ctx.settings.engine_cache.as_deref(),
            &dir,
        ),
        ..SessionConfig::default()
    })
}

impl NodeKind for Caption {
    fn name(&self) -> &'static str {
        "caption"
    }
    fn version(&self) -> u32 {
        1
    }
    fn inputs(&self) -> &'static [InputSlot] {
        &[InputSlot {
            name: "images",
            accepts: &[ArtifactType::Images],
            many: false,
            required: true,
        }]
    }
    fn models(&self) -> &'static [ModelSlot] {
        &[ModelSlot {
            name: "model",
            families: &["blip2", "vit-gpt2"],
        }]
    }
    fn output(&self) -> ArtifactType {
        ArtifactType::Captions
    }
    fn param_names(&self) -> &'static [&'static str] {
        &[
            "max_new_tokens",
            "num_beams",
            "prompt",
            "min_new_tokens",
            "repetition_penalty",
            "no_repeat_ngram_size",
            "length_penalty",
            "early_stopping",
            "on_error",
            "batch_size",
        ]
    }
    fn speed_only(&self) -> &'static [&'static str] {
        &["batch_size"]
    }
    fn journaled(&self) -> bool {
        true
    }
    fn resolve_params(&self, table: &toml::Table) -> Result<serde_json::Value, ParamError> {
        let value = super::resolve_typed::<CaptionParams>(table)?;
        let params: CaptionParams =
            serde_json::from_value(value.clone()).map_err(|e| ParamError {
                key: None,
                message: e.to_string(),
            })?;
        for (key, bad) in [
            ("max_new_tokens", params.max_new_tokens == 0),
            ("num_beams", params.num_beams == 0),
            ("batch_size", params.batch_size == 0),
            ("repetition_penalty", params.repetition_penalty <= 0.0),
        ] {
            if bad {
                return Err(ParamError {
                    key: Some(key.into()),
                    message: "must be positive".into(),
                });
            }
        }
        if params.min_new_tokens > params.max_new_tokens {
            return Err(ParamError {
                key: Some("min_new_tokens".into()),
                message: format!(
                    "is {} but max_new_tokens is {}",
                    params.min_new_tokens, params.max_new_tokens
                ),
            });
        }
        Ok(value)
    }

    fn run(&self, ctx: &mut RunContext<'_>) -> Result<RunSummary, NodeError> {
        let params: CaptionParams = ctx.params()?;
        let images = ctx.input("images")?.clone();
        let model = ctx
            .models
            .get("model")
            .cloned()
            .ok_or_else(|| NodeError::MissingInput("model".into()))?;
        let items = list_images(&images.dir)?;
        let done = ctx.builder.journal_done("captions")?;
        let already = items.iter().filter(|i| done.contains(&i.id)).count();
        let mut progress = ctx.progress(items.len() as u64, already as u64);
        let model_error = |e: CaptionModelError| NodeError::Failed(e.to_string());
        let options = params.options();
        // Opened on the first part with work: a finaliser after complete shards needs no model.
        let mut captioner: Option<Captioner> = None;
        ctx.for_each_todo(
            "captions",
            &items,
            |i| &i.id,
            &done,
            |journal, todo| {
                if captioner.is_none() {
                    captioner = Some(
                        Captioner::open(
                            &model.family,
                            &model.dir,
                            &session_config(ctx, &model.dir)?,
                        )
                        .map_err(model_error)?,
                    );
                }
                let captioner = captioner.as_mut().expect("opened above");
                let settings = captioner.image_settings().clone();
                for chunk in todo.chunks(params.batch_size) {
                    let mut records = Vec::new();
                    let mut pixels = Vec::new();
                    let mut ready = Vec::new();
                    for item in chunk {
                        let loaded = load_rgb(&item.path, &settings.rgb_conversion)
                            .and_then(|rgb| pixel_values(&rgb, &settings));
                        match loaded {
                            Ok(p) => {
                                pixels.extend(p);
                                ready.push(*item);
                            }
                            Err(e) if params.on_error == OnError::Skip => {
                                tracing::warn!("{}: skipped: {e}", ctx.node);
                                records.push(serde_json::json!({
                                    "item": item.id, "class": item.class, "skipped": e.to_string(),
                                }));
                            }
                            Err(e) => {
                                return Err(NodeError::Failed(format!(
                                    "{e} (set on_error = \"skip\" to caption the other images)"
                                )))
                            }
                        }
                    }
                    if !ready.is_empty() {
                        let captions = captioner
                            .caption(&pixels, ready.len(), params.prompt.as_deref(), &options)
                            .map_err(model_error)?;
                        for (item, c) in ready.iter().zip(captions) {
                            records.push(serde_json::json!({
                                "item": item.id, "class": item.class,
                                "caption": c.caption, "tokens": c.tokens,
                            }));
                        }
                    }
                    journal.append_batch(&records)?;
                    progress.advance(chunk.len() as u64);
                }
                Ok(())
            },
        )?;
        if ctx.is_shard_worker() {
            return Ok(RunSummary::default());
        }
        let mut rows: Vec<[String; 4]> = Vec::new();
        let mut skipped = 0u64;
        // All journals count: the node's own and those of its shards, whatever the split.
        for r in &ctx.builder.journal_records("captions")? {
            let id = r["item"].as_str().unwrap_or_default().to_string();
            if r.get("skipped").is_some() {
                skipped += 1;
                continue;
            }
            rows.push([
                id,
                r["class"].as_str().unwrap_or_default().to_string(),
                r["caption"].as_str().unwrap_or_default().to_string(),
                r["tokens"].as_u64().unwrap_or_default().to_string(),
            ]);
        }
        rows.sort();
        rows.dedup_by(|a, b| a[0] == b[0]);
        write_csv(
            &ctx.out.join("captions.csv"),
            &["id", "class", "caption", "tokens"],
            &rows,
        )
        .map_err(|e| NodeError::Failed(e.to_string()))?;
        let mut summary = RunSummary::default();
        summary.counts.insert("captions".into(), rows.len() as u64);
        summary.counts.insert("skipped".into(), skipped);
        Ok(summary)
    }
}

/// `cip caption --model DIR [--max-new-tokens N] [--beams K] [--prompt TEXT] [--json] IMAGE...`:
/// captions image files directly, without an experiment or the cache.
pub mod cli {
    use std::path::PathBuf;

    use super::Captioner;
    use crate::models::decoding::{CaptionModelError, GenerateOptions};
    use crate::models::preprocess::{load_rgb, pixel_values, PreprocessError};
    use crate::runtime::{Provider, RuntimeError, SessionConfig};

    #[derive(Debug, Clone, clap::Args)]
    pub struct CaptionArgs {
        /// A blip2 or vit-gpt2 model directory (with cip-model.toml).
        #[arg(long)]
        pub model: PathBuf,
        #[arg(long, default_value_t = 16)]
        pub max_new_tokens: usize,
        /// Beam width; 1 is greedy decoding.
        #[arg(long, default_value_t = 1)]
        pub beams: usize,
        /// Text the caption continues (e.g. "a photo of").
        #[arg(long)]
        pub prompt: Option<String>,
        /// Execution provider: cpu, cuda[:N], tensorrt[:N].
        #[arg(long, default_value = "cpu")]
        pub provider: String,
        /// One JSON array of {image, caption, tokens} instead of `IMAGE<TAB>CAPTION` lines.
        #[arg(long)]
        pub json: bool,
        /// Image files.
        #[arg(required = true)]
        pub images: Vec<PathBuf>,
    }

    #[derive(Debug, thiserror::Error)]
    pub enum CaptionCliError {
        #[error(transparent)]
        Model(#[from] CaptionModelError),
        #[error(transparent)]
        Image(#[from] PreprocessError),
        #[error(transparent)]
        Runtime(#[from] RuntimeError),
        #[error("--beams and --max-new-tokens must be at least 1")]
        Settings,
    }

    /// One captioned file.
    #[derive(Debug, Clone, PartialEq, serde::Serialize)]
    pub struct FileCaption {
        pub image: String,
        pub caption: String,
        pub tokens: usize,
    }

    /// Captions every file of `args` in one batch.
    pub fn caption_files(args: &CaptionArgs) -> Result<Vec<FileCaption>, CaptionCliError> {
        if args.beams == 0 || args.max_new_tokens == 0 {
            return Err(CaptionCliError::Settings);
        }
        let session = SessionConfig::with_provider(args.provider.parse::<Provider>()?);
        let mut captioner = Captioner::open_any(&args.model, &session)?;
        let settings = captioner.image_settings().clone();
        let mut pixels = Vec::new();
        for image in &args.images {
            let rgb = load_rgb(image, &settings.rgb_conversion)?;
            pixels.extend(pixel_values(&rgb, &settings)?);
        }
        let options = GenerateOptions {
            max_new_tokens: args.max_new_tokens,
            num_beams: args.beams,
            ..GenerateOptions::default()
        };
        let captions =
            captioner.caption(&pixels, args.images.len(), args.prompt.as_deref(), &options)?;
        Ok(args
            .images
            .iter()
            .zip(captions)
            .map(|(image, c)| FileCaption {
                image: image.display().to_string(),
                caption: c.caption,
                tokens: c.tokens,
            })
            .collect())
    }

    pub fn run(args: &CaptionArgs) -> Result<(), CaptionCliError> {
        let captions = caption_files(args)?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&captions).expect("captions serialise")
            );
        } else {
            for c in captions {
                println!("{}\t{}", c.image, c.caption);
            }
        }
        Ok(())
    }
}
