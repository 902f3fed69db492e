//! train: image sets / dataset splits + an exported classifier -> a trained classifier.
//!
//! SGD runs through the model's `train_step.onnx`; the train state stays in Rust. Every epoch ends
//! with a checkpoint (state + epoch + log rows) in the partial directory, written temp + rename,
//! so a killed run resumes from its last finished epoch. Epoch shuffles and augmentations are pure
//! functions of (seed, epoch, item), so a resumed run produces the same weights as an unbroken one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    Artifact, ArtifactType, InputSlot, ModelSlot, NodeError, NodeKind, ParamError, RunContext,
    RunSummary,
};
use crate::data::augment::{self, Interpolation, TrainTransform};
use crate::data::{imagefolder, CsvTable};
use crate::models::classifier::{Classifier, StepScalars, TrainState};
use crate::runtime::{FileEntry, SessionConfig, MANIFEST_FILE};

pub struct Train;

mod mix;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Multistep,
    Cosine,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    pub epochs: u32,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_lr")]
    pub lr: f32,
    #[serde(default = "default_momentum")]
    pub momentum: f32,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f32,
    #[serde(default)]
    pub nesterov: bool,
    #[serde(default)]
    pub label_smoothing: f32,
    #[serde(default)]
    pub schedule: Schedule,
    /// Epochs at which multistep multiplies the rate by `gamma`.
    #[serde(default)]
    pub milestones: Vec<u32>,
    #[serde(default = "default_gamma")]
    pub gamma: f32,
    #[serde(default)]
    pub warmup_epochs: u32,
    /// Must equal the model's baked-in image size when given (the graphs have static spatial dims).
    #[serde(default)]
    pub image_size: Option<u32>,
    #[serde(default)]
    pub interpolation: Interpolation,
    /// Data reference (as written in `data`) -> fraction of each epoch's samples (mix.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mix: Option<BTreeMap<String, f64>>,
    /// Decode each image once, shrunk to this shorter side, and train from the raw copy
    /// (augment::DecodeCache). In the key: shrinking changes what the crops see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_cache: Option<u32>,
}

fn default_batch_size() -> usize {
    64
}
fn default_lr() -> f32 {
    0.1
}
fn default_momentum() -> f32 {
    0.9
}
fn default_weight_decay() -> f32 {
    5e-4
}
fn default_gamma() -> f32 {
    0.2
}

const INPUTS: &[InputSlot] = &[InputSlot {
    name: "data",
    accepts: &[ArtifactType::Images],
    many: true,
    required: true,
}];

const MODELS: &[ModelSlot] = &[ModelSlot {
    name: "model",
    families: &["classifier"],
}];

/// The learning rate of `epoch` (0-based).
pub fn epoch_lr(p: &TrainParams, epoch: u32) -> f32 {
    match p.schedule {
        Schedule::Multistep => {
            let passed = p.milestones.iter().filter(|&&m| epoch >= m).count();
            p.lr * p.gamma.powi(passed as i32)
        }
        Schedule::Cosine => {
            if epoch < p.warmup_epochs {
                return p.lr * (epoch + 1) as f32 / p.warmup_epochs as f32;
            }
            let span = (p.epochs - p.warmup_epochs).max(1) as f32;
            let t = (epoch - p.warmup_epochs) as f32 / span;
            0.5 * p.lr * (1.0 + (std::f32::consts::PI * t).cos())
        }
    }
}

/// One training image.
#[derive(Debug, Clone)]
pub struct LabelledImage {
    pub path: PathBuf,
    pub class: String,
}

/// Images of an artifact: its manifest.csv (path relative to the artifact, class), or an
/// ImageFolder scan for a dataset split without one.
pub fn artifact_images(a: &Artifact) -> Result<Vec<LabelledImage>, NodeError> {
    let manifest = a.dir.join("manifest.csv");
    let failed = |e: crate::data::DataError| NodeError::Failed(format!("{}: {e}", a.origin));
    if manifest.is_file() {
        let t = CsvTable::read(&manifest).map_err(failed)?;
        let path = t.require("path").map_err(failed)?;
        let class = t.require("class").map_err(failed)?;
        Ok(t.rows
            .iter()
            .map(|r| LabelledImage {
                path: a.dir.join(&r[path]),
                class: r[class].to_string(),
            })
            .collect())
    } else {
        Ok(imagefolder::scan(&a.dir)
            .map_err(failed)?
            .into_iter()
            .map(|i| LabelledImage {
                path: a.dir.join(&i.path),
                class: i.class,
            })
            .collect())
    }
}

const CHECKPOINT_DIR: &str = "checkpoint";
const CHECKPOINT_FILE: &str = "state.safetensors";
const DECODE_CACHE_DIR: &str = "decode_cache";
const LOG_HEADER: &str = "epoch,loss,lr,images_per_sec\n";

impl NodeKind for Train {
    fn name(&self) -> &'static str {
        "train"
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
        ArtifactType::Classifier
    }
    fn param_names(&self) -> &'static [&'static str] {
        &[
            "epochs",
            "batch_size",
            "lr",
            "momentum",
            "weight_decay",
            "nesterov",
            "label_smoothing",
            "schedule",
            "milestones",
            "gamma",
            "warmup_epochs",
            "image_size",
            "interpolation",
            "mix",
            "decode_cache",
        ]
    }
    fn seeded(&self) -> bool {
        true
    }
    fn resolve_params(&self, table: &toml::Table) -> Result<serde_json::Value, ParamError> {
        let value = super::resolve_typed::<TrainParams>(table)?;
        let p: TrainParams = serde_json::from_value(value.clone()).unwrap();
        let bad = |key: &str, message: &str| ParamError {
            key: Some(key.into()),
            message: message.into(),
        };
        if p.epochs == 0 {
            return Err(bad("epochs", "must be at least 1"));
        }
        if p.batch_size < 2 {
            return Err(bad(
                "batch_size",
                "must be at least 2 (BatchNorm in train mode needs two images)",
            ));
        }
        if p.warmup_epochs >= p.epochs && p.schedule == Schedule::Cosine && p.warmup_epochs > 0 {
            return Err(bad("warmup_epochs", "must be smaller than epochs"));
        }
        if let Some(mix) = &p.mix {
            for (source, f) in mix {
                if !(0.0..=1.0).contains(f) {
                    return Err(bad(
                        "mix",
                        &format!("`{source}` = {f}: a fraction must be within 0..=1"),
                    ));
                }
            }
            let sum: f64 = mix.values().sum();
            if sum > 1.0 + 1e-9 {
                return Err(bad("mix", &format!("fractions add up to {sum}; at most 1")));
            }
        }
        Ok(value)
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<RunSummary, NodeError> {
        let p: TrainParams = ctx.params()?;
        let model = ctx
            .models
            .get("model")
            .ok_or_else(|| NodeError::MissingInput("model".into()))?
            .clone();
        let session = SessionConfig {
            intra_threads: Some(ctx.settings.threads.max(1)),
            ..SessionConfig::default()
        };
        let failed = |e: crate::models::classifier::ClassifierError| {
            NodeError::Failed(format!("node `{}`: {e}", ctx.node))
        };
        let mut classifier = Classifier::open(&model.dir, session).map_err(failed)?;
        let config = classifier.config.clone();
        if let Some(size) = p.image_size {
            if size != config.image_size {
                return Err(NodeError::Failed(format!(
                    "node `{}`: image_size = {size}, but model `{}` was exported for {}px (its graphs have static spatial dims); drop image_size or re-export with --image-size {size}",
                    ctx.node, model.name, config.image_size
                )));
            }
        }

        if let Some(side) = p.decode_cache {
            if side < config.image_size {
                return Err(NodeError::Failed(format!(
                    "node `{}`: decode_cache = {side} is below the {}px training size; crops would be enlarged from a shrunk copy: use {} or more",
                    ctx.node, config.image_size, config.image_size
                )));
            }
        }
        let decode_cache = p.decode_cache.map(|shorter_side| augment::DecodeCache {
            dir: ctx.out.join(DECODE_CACHE_DIR),
            shorter_side,
            filter: p.interpolation,
        });
        let mut images = Vec::new();
        let mut sources = Vec::new();
        for a in ctx.inputs.get("data").into_iter().flatten() {
            let start = images.len();
            images.extend(artifact_images(a)?);
            sources.push(mix::Source {
                name: super::eval::test_set_name(&a.origin),
                start,
                len: images.len() - start,
            });
        }
        let quotas = match &p.mix {
            None => None,
            Some(fractions) => Some(mix_quotas(ctx.node, &sources, fractions)?),
        };
        let classes: Vec<String> = images
            .iter()
            .map(|i| i.class.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if classes.len() > config.num_classes {
            return Err(NodeError::Failed(format!(
                "node `{}`: the data has {} classes, but model `{}` has only {} outputs; export it with --num-classes {} or more",
                ctx.node,
                classes.len(),
                model.name,
                config.num_classes,
                classes.len()
            )));
        }
        if images.is_empty() {
            let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
            return Err(NodeError::Failed(format!(
                "node `{}`: no training images in {}; check that data names the right split and that it holds images",
                ctx.node,
                names.join(", ")
            )));
        }
        if images.len() < config.min_train_batch {
            return Err(NodeError::Failed(format!(
                "node `{}`: {} training images, but one SGD step needs at least {} (BatchNorm in train mode)",
                ctx.node,
                images.len(),
                config.min_train_batch
            )));
        }
        let label_of: HashMap<&str, i64> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i as i64))
            .collect();
        // A batch size above the data size trains on one batch of all images per epoch.
        let batch_size = p.batch_size.min(images.len());
        if batch_size < p.batch_size {
            tracing::warn!(
                "node `{}`: batch_size {} is larger than the {} training images; each epoch is one batch of {}",
                ctx.node,
                p.batch_size,
                images.len(),
                batch_size
            );
        }

        let checkpoint_dir = ctx.out.join(CHECKPOINT_DIR);
        let checkpoint = checkpoint_dir.join(CHECKPOINT_FILE);
        let (mut state, mut log, first_epoch) = if checkpoint.is_file() {
            let bytes = std::fs::read(&checkpoint).map_err(NodeError::io(&checkpoint))?;
            let (_, meta) =
                safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| NodeError::File {
                    path: checkpoint.clone(),
                    message: e.to_string(),
                })?;
            let meta = meta.metadata().clone().unwrap_or_default();
            let epoch: u32 = meta
                .get("epoch")
                .and_then(|e| e.parse().ok())
                .ok_or_else(|| NodeError::File {
                    path: checkpoint.clone(),
                    message: "checkpoint lacks its epoch".into(),
                })?;
            let state =
                TrainState::read(&checkpoint, &classifier.state_names(), "").map_err(failed)?;
            tracing::info!("node `{}`: resuming after epoch {epoch}", ctx.node);
            (state, meta.get("log").cloned().unwrap_or_default(), epoch)
        } else {
            (
                classifier.initial_state().map_err(failed)?,
                String::new(),
                0,
            )
        };

        let transform = TrainTransform {
            interpolation: p.interpolation,
            ..TrainTransform::new(config.image_size, config.mean, config.std)
        };
        let mut order: Vec<usize> = (0..images.len()).collect();
        let mut samples: Vec<(usize, u64)> = Vec::new();
        let mut last_loss = f32::NAN;
        for epoch in first_epoch..p.epochs {
            let lr = epoch_lr(&p, epoch);
            let scalars = StepScalars {
                lr,
                momentum: p.momentum,
                weight_decay: p.weight_decay,
                nesterov: p.nesterov,
                label_smoothing: p.label_smoothing,
            };
            if let Some(quotas) = &quotas {
                samples = mix::epoch_samples(&sources, quotas, ctx.seed, epoch);
            } else {
                let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed);
                rng.set_stream(u64::from(epoch));
                order.sort_unstable();
                order.shuffle(&mut rng);
                samples.clear();
                samples.extend(order.iter().map(|&i| (i, i as u64)));
            }
            let started = Instant::now();
            let (mut loss_sum, mut seen) = (0f64, 0usize);
            let chunks: Vec<&[(usize, u64)]> = samples
                .chunks(batch_size)
                .filter(|c| c.len() >= config.min_train_batch)
                .collect();
            let prepare = |chunk: &[(usize, u64)]| -> Result<_, NodeError> {
                let labels: Vec<i64> = chunk
                    .iter()
                    .map(|&(i, _)| label_of[images[i].class.as_str()])
                    .collect();
                let load = |i: usize| match &decode_cache {
                    Some(cache) => cache.load(i, &images[i].path),
                    None => augment::decode(&images[i].path),
                };
                let batch =
                    augment::train_batch_with(chunk, load, &transform, ctx.seed, epoch.into())
                        .map_err(|e| NodeError::Failed(e.to_string()))?;
                Ok((batch, labels))
            };
            let prepare = &prepare;
            // Batch k+1 is decoded and augmented while step k runs; both are pure functions of
            // (seed, epoch, item), so the overlap changes no result.
            std::thread::scope(|scope| -> Result<(), NodeError> {
                let mut next = chunks.first().map(|&c| scope.spawn(move || prepare(c)));
                for (k, chunk) in chunks.iter().enumerate() {
                    let (batch, labels) = next
                        .take()
                        .expect("spawned for every chunk")
                        .join()
                        .map_err(|_| {
                        NodeError::Failed("batch preparation panicked".into())
                    })??;
                    next = chunks.get(k + 1).map(|&c| scope.spawn(move || prepare(c)));
                    let loss = classifier
                        .train_step(&mut state, batch.view(), &labels, scalars)
                        .map_err(failed)?;
                    if !loss.is_finite() {
                        return Err(NodeError::Failed(format!(
                            "node `{}`: loss became {loss} in epoch {} (lr {lr}); the last good checkpoint (epoch {epoch}) is kept; lower lr or check the data",
                            ctx.node,
                            epoch + 1
                        )));
                    }
                    loss_sum += loss as f64 * chunk.len() as f64;
                    seen += chunk.len();
                }
                Ok(())
            })?;
            let seconds = started.elapsed().as_secs_f64().max(1e-9);
            last_loss = (loss_sum / seen.max(1) as f64) as f32;
            log.push_str(&format!(
                "{},{last_loss},{lr},{:.1}\n",
                epoch + 1,
                seen as f64 / seconds
            ));
            tracing::info!(
                "node `{}`: epoch {}/{} loss {last_loss:.4} lr {lr} {:.1} images/s",
                ctx.node,
                epoch + 1,
                p.epochs,
                seen as f64 / seconds
            );
            write_checkpoint(&checkpoint_dir, &state, epoch + 1, &log)?;
        }

        classifier
            .write_forward_model(&state, ctx.out)
            .map_err(failed)?;
        let classes_txt = ctx.out.join("classes.txt");
        std::fs::write(&classes_txt, classes.join("\n") + "\n")
            .map_err(NodeError::io(&classes_txt))?;
        let log_path = ctx.out.join("train_log.csv");
        std::fs::write(&log_path, format!("{LOG_HEADER}{log}"))
            .map_err(NodeError::io(&log_path))?;
        write_manifest(&classifier, ctx.out, classes.len())?;
        if let Some(quotas) = &quotas {
            let rows = sources
                .iter()
                .zip(quotas)
                .map(|(s, q)| [s.name.clone(), s.len.to_string(), q.to_string()]);
            let path = ctx.out.join("mix.csv");
            crate::data::table::write_csv(&path, &["source", "images", "samples_per_epoch"], rows)
                .map_err(|e| NodeError::Failed(e.to_string()))?;
        }
        std::fs::remove_dir_all(&checkpoint_dir).map_err(NodeError::io(&checkpoint_dir))?;
        if let Some(cache) = &decode_cache {
            if cache.dir.exists() {
                std::fs::remove_dir_all(&cache.dir).map_err(NodeError::io(&cache.dir))?;
            }
        }

        let mut summary = RunSummary::default();
        summary.counts.insert("images".into(), images.len() as u64);
        summary
            .counts
            .insert("classes".into(), classes.len() as u64);
        summary.counts.insert("epochs".into(), p.epochs.into());
        summary.extra = serde_json::json!({ "final_loss": last_loss });
        Ok(summary)
    }
}

/// Per-source samples per epoch for `mix`, after checking it names sources of `data`.
fn mix_quotas(
    node: &str,
    sources: &[mix::Source],
    fractions: &BTreeMap<String, f64>,
) -> Result<Vec<usize>, NodeError> {
    let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
    for name in fractions.keys() {
        if !names.contains(&name.as_str()) {
            return Err(NodeError::Failed(format!(
                "node `{node}`: mix names `{name}`, which is not in data ({}); use the references as written in data",
                names.join(", ")
            )));
        }
    }
    for s in sources {
        if s.len == 0 && fractions.get(&s.name).is_some_and(|f| *f > 0.0) {
            return Err(NodeError::Failed(format!(
                "node `{node}`: mix gives `{}` a fraction, but it has no images",
                s.name
            )));
        }
    }
    let per_source: Vec<Option<f64>> = sources
        .iter()
        .map(|s| fractions.get(&s.name).copied())
        .collect();
    let sum: f64 = per_source.iter().flatten().sum();
    let unnamed = sources
        .iter()
        .zip(&per_source)
        .any(|(s, f)| f.is_none() && s.len > 0);
    if !unnamed && (sum - 1.0).abs() > 1e-6 {
        return Err(NodeError::Failed(format!(
            "node `{node}`: mix fractions add up to {sum}, but no other source of data takes the rest; make them add up to 1"
        )));
    }
    Ok(mix::quotas(sources, &per_source))
}

fn write_checkpoint(
    dir: &Path,
    state: &TrainState,
    epoch: u32,
    log: &str,
) -> Result<(), NodeError> {
    std::fs::create_dir_all(dir).map_err(NodeError::io(dir))?;
    let metadata = HashMap::from([
        ("epoch".to_string(), epoch.to_string()),
        ("log".to_string(), log.to_string()),
    ]);
    let bytes = state
        .to_bytes(Some(metadata))
        .map_err(|e| NodeError::Failed(e.to_string()))?;
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    std::fs::write(&tmp, bytes).map_err(NodeError::io(&tmp))?;
    let target = dir.join(CHECKPOINT_FILE);
    std::fs::rename(&tmp, &target).map_err(NodeError::io(&target))
}

/// The trained directory's manifest: the source manifest with only the forward graph, the files
/// that are really there, and `num_classes_trained` / `classes_file` added to [config].
fn write_manifest(classifier: &Classifier, out: &Path, classes: usize) -> Result<(), NodeError> {
    let mut manifest = classifier.dir.manifest().clone();
    manifest.graphs.retain(|role, _| role == "forward");
    let forward = manifest
        .graphs
        .get("forward")
        .map(|g| g.path.clone())
        .unwrap_or_else(|| "model.onnx".into());
    let mut files = Vec::new();
    for path in [
        forward.as_str(),
        classifier.config.weights_file.as_str(),
        "classes.txt",
    ] {
        let full = out.join(path);
        let bytes = std::fs::read(&full).map_err(NodeError::io(&full))?;
        files.push(FileEntry {
            path: path.to_string(),
            size: bytes.len() as u64,
            blake3: blake3::hash(&bytes).to_hex().to_string(),
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut lines = String::new();
    for f in &files {
        lines.push_str(&format!("{}\t{}\t{}\n", f.path, f.size, f.blake3));
    }
    manifest.digest.blake3 = blake3::hash(lines.as_bytes()).to_hex().to_string();
    manifest.digest.files = files.len() as u64;
    manifest.files = files;
    manifest
        .config
        .insert("classes_file".into(), toml::Value::from("classes.txt"));
    manifest.config.insert(
        "num_classes_trained".into(),
        toml::Value::from(classes as i64),
    );
    let text = toml::to_string(&manifest).map_err(|e| NodeError::Failed(e.to_string()))?;
    let path = out.join(MANIFEST_FILE);
    std::fs::write(&path, text).map_err(NodeError::io(&path))
}
