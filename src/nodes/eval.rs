//! eval: a trained classifier + test sets -> top-1 / top-5 accuracy per test set.
//!
//! Test images map to classifier outputs by class folder id (WordNet id): output i is line i of
//! the classifier's `classes.txt`. A test class the classifier never saw is an error naming it
//! (usually a wrong split or class mapping); `skip_unknown_classes = true` leaves such images out
//! instead (counted as `skipped`). `mask` names a class file whose classes alone compete (e.g. an ImageNet-100
//! subset evaluated with a 1000-way head).
//!
//! With a `members` input (the classifier's training split) the node also runs the
//! membership-inference attack (membership.rs) against the non-member set: the test set named by
//! `nonmembers`, else the first one.

pub mod classify;
mod membership;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::train::artifact_images;
use super::{ArtifactType, InputSlot, NodeError, NodeKind, ParamError, RunContext, RunSummary};
use crate::data::augment::{self, EvalResize, Interpolation};
use crate::data::table::write_csv;
use crate::models::classifier::{forward_logits, ClassifierConfig};
use crate::runtime::{Family, ModelDir, SessionConfig};

pub struct Eval;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    /// Must equal the classifier's image size when given.
    #[serde(default)]
    pub image_size: Option<u32>,
    /// Class file (one id per line, or `id,name` CSV rows): only these classes' logits compete.
    #[serde(default)]
    pub mask: Option<String>,
    #[serde(default)]
    pub interpolation: Interpolation,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Test set (metrics.json name) used as non-members by the membership attack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonmembers: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_unknown_classes: bool,
    /// `{ mode = "square" }` (default, the paper) or `{ mode = "center_crop", crop_pct = 0.875 }`.
    #[serde(default, skip_serializing_if = "is_square")]
    pub resize: EvalResize,
}

fn is_square(r: &EvalResize) -> bool {
    *r == EvalResize::Square
}

fn default_batch_size() -> usize {
    64
}

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "classifier",
        accepts: &[ArtifactType::Classifier],
        many: false,
        required: true,
    },
    InputSlot {
        name: "test",
        accepts: &[ArtifactType::Images],
        many: true,
        required: true,
    },
    InputSlot {
        name: "members",
        accepts: &[ArtifactType::Images],
        many: false,
        required: false,
    },
];

/// Test set name in metrics.json: `demo.val` for a dataset split, the node name otherwise.
pub fn test_set_name(origin: &str) -> String {
    origin
        .strip_prefix("dataset ")
        .or_else(|| origin.strip_prefix("node "))
        .unwrap_or(origin)
        .to_string()
}

/// Output indices, best first, among the competing ones (`allowed`, or all). Ties break toward the
/// lower index, like torch.topk on CPU.
fn ranked_outputs(logits: ndarray::ArrayView1<'_, f32>, allowed: Option<&[bool]>) -> Vec<usize> {
    let mut ranked: Vec<usize> = (0..logits.len())
        .filter(|&i| allowed.is_none_or(|a| a[i]))
        .collect();
    ranked.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    ranked
}

/// One image to score, in listing order of its set.
struct ScoreItem {
    id: String,
    /// `test` (scored for accuracy) or `member` (the membership attack's training images).
    role: &'static str,
    set: String,
    class: String,
    path: std::path::PathBuf,
}

fn read_class_ids(path: &Path) -> Result<Vec<String>, NodeError> {
    let text = std::fs::read_to_string(path).map_err(NodeError::io(path))?;
    Ok(text
        .lines()
        .map(|l| l.split(',').next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty() && l != "id")
        .collect())
}

impl NodeKind for Eval {
    fn name(&self) -> &'static str {
        "eval"
    }
    fn version(&self) -> u32 {
        // Still 1: scoring per item through a journal (resumable, shardable) left results as
        // they were, so cached evaluations stay valid.
        1
    }
    fn inputs(&self) -> &'static [InputSlot] {
        INPUTS
    }
    fn output(&self) -> ArtifactType {
        ArtifactType::Metrics
    }
    fn param_names(&self) -> &'static [&'static str] {
        &[
            "image_size",
            "mask",
            "interpolation",
            "batch_size",
            "nonmembers",
            "skip_unknown_classes",
            "resize",
        ]
    }
    fn speed_only(&self) -> &'static [&'static str] {
        &["batch_size"]
    }
    fn file_params(&self) -> &'static [&'static str] {
        &["mask"]
    }
    fn journaled(&self) -> bool {
        true
    }
    fn resolve_params(&self, table: &toml::Table) -> Result<serde_json::Value, ParamError> {
        let value = super::resolve_typed::<EvalParams>(table)?;
        let p: EvalParams = serde_json::from_value(value.clone()).unwrap();
        if let EvalResize::CenterCrop { crop_pct } = p.resize {
            if !(crop_pct > 0.0 && crop_pct <= 1.0) {
                return Err(ParamError {
                    key: Some("resize.crop_pct".into()),
                    message: format!("{crop_pct} must be within (0, 1]"),
                });
            }
        }
        if p.batch_size == 0 {
            return Err(ParamError {
                key: Some("batch_size".into()),
                message: "must be at least 1".into(),
            });
        }
        Ok(value)
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<RunSummary, NodeError> {
        let p: EvalParams = ctx.params()?;
        let classifier = ctx.input("classifier")?.clone();
        let failed = |e: crate::runtime::RuntimeError| {
            NodeError::Failed(format!("node `{}`: {e}", ctx.node))
        };
        let dir = ModelDir::open(&classifier.dir, Some(Family::Classifier)).map_err(failed)?;
        let config: ClassifierConfig = dir.config_as().map_err(failed)?;
        if let Some(size) = p.image_size {
            if size != config.image_size {
                return Err(NodeError::Failed(format!(
                    "node `{}`: image_size = {size}, but the classifier takes {}px images",
                    ctx.node, config.image_size
                )));
            }
        }
        let classes = read_class_ids(&dir.path("classes.txt"))?;
        let index_of: HashMap<&str, usize> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();
        let allowed: Option<Vec<bool>> = match &p.mask {
            None => None,
            Some(file) => {
                let ids = read_class_ids(&ctx.resolve_file(file))?;
                let mut keep = vec![false; config.num_classes];
                for id in &ids {
                    if let Some(&i) = index_of.get(id.as_str()) {
                        keep[i] = true;
                    }
                }
                Some(keep)
            }
        };
        let tests = ctx.inputs.get("test").cloned().unwrap_or_default();
        let members = ctx.inputs.get("members").and_then(|m| m.first()).cloned();
        let nonmember_set = match (&members, &p.nonmembers) {
            (None, _) => None,
            (Some(_), Some(wanted)) => Some(wanted.clone()),
            (Some(_), None) => tests.first().map(|t| test_set_name(&t.origin)),
        };
        if let Some(wanted) = &nonmember_set {
            let names: Vec<String> = tests.iter().map(|t| test_set_name(&t.origin)).collect();
            if !names.contains(wanted) {
                return Err(NodeError::Failed(format!(
                    "node `{}`: nonmembers = \"{wanted}\" is none of the test sets ({}); name one of them",
                    ctx.node,
                    names.join(", ")
                )));
            }
        }

        // Every image to score is an item: `test:<set>:<path>` or `member:<set>:<path>`. Items
        // are journaled with their ranking and true-label confidence, so the node resumes after a
        // crash and splits into shards; the metrics are computed from the journals at the end.
        let mut items: Vec<ScoreItem> = Vec::new();
        let mut skipped_per_set: BTreeMap<String, u64> = BTreeMap::new();
        let mut sets: Vec<(String, &super::Artifact, &'static str)> = tests
            .iter()
            .map(|t| (test_set_name(&t.origin), t, "test"))
            .collect();
        if let Some(m) = &members {
            sets.push((test_set_name(&m.origin), m, "member"));
        }
        for (name, artifact, role) in &sets {
            let images = artifact_images(artifact)?;
            let unknown: BTreeSet<&str> = images
                .iter()
                .map(|i| i.class.as_str())
                .filter(|c| !index_of.contains_key(c))
                .collect();
            if *role == "test" && !unknown.is_empty() && !p.skip_unknown_classes {
                let unknown: Vec<&str> = unknown.into_iter().collect();
                return Err(NodeError::Failed(format!(
                    "node `{}`: test set {name} has class{} {}, which the classifier ({}) lacks; it knows {} classes: {}{}; check the split and the classifier, or set skip_unknown_classes = true to leave those images out",
                    ctx.node,
                    if unknown.len() == 1 { "" } else { "es" },
                    unknown.join(", "),
                    test_set_name(&classifier.origin),
                    classes.len(),
                    classes.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                    if classes.len() > 5 { ", ..." } else { "" },
                )));
            }
            for image in images {
                if !index_of.contains_key(image.class.as_str()) {
                    if *role == "test" {
                        *skipped_per_set.entry(name.clone()).or_default() += 1;
                    }
                    continue;
                }
                let rel = image
                    .path
                    .strip_prefix(&artifact.dir)
                    .unwrap_or(&image.path);
                items.push(ScoreItem {
                    id: format!("{role}:{name}:{}", rel.display()),
                    role,
                    set: name.clone(),
                    class: image.class,
                    path: image.path,
                });
            }
        }
        let done = ctx.builder.journal_done("scores")?;
        let already = items.iter().filter(|i| done.contains(&i.id)).count();
        let mut progress = ctx.progress(items.len() as u64, already as u64);
        // Opened on the first part with work: a finaliser after complete shards needs no model.
        let mut session = None;
        ctx.for_each_todo(
            "scores",
            &items,
            |i| &i.id,
            &done,
            |journal, todo| {
                if session.is_none() {
                    let config = SessionConfig {
                        intra_threads: Some(ctx.settings.threads.max(1)),
                        ..SessionConfig::default()
                    };
                    session = Some(dir.session("forward", &config).map_err(failed)?);
                }
                let session = session.as_mut().expect("opened above");
                for chunk in todo.chunks(p.batch_size.max(1)) {
                    let paths: Vec<&Path> = chunk.iter().map(|i| i.path.as_path()).collect();
                    let batch = augment::eval_batch_with(
                        &paths,
                        config.image_size,
                        p.interpolation,
                        p.resize,
                        config.mean,
                        config.std,
                    )
                    .map_err(|e| NodeError::Failed(e.to_string()))?;
                    let logits = forward_logits(session, dir.root(), batch.view())
                        .map_err(|e| NodeError::Failed(format!("node `{}`: {e}", ctx.node)))?;
                    let mut records = Vec::with_capacity(chunk.len());
                    for (item, row) in chunk.iter().zip(logits.rows()) {
                        let truth = index_of[item.class.as_str()];
                        let mut ranked = ranked_outputs(row, allowed.as_deref());
                        ranked.truncate(5);
                        let confidence =
                            membership::true_label_confidence(row, truth, allowed.as_deref());
                        records.push(serde_json::json!({
                            "item": item.id,
                            "top5": ranked,
                            "confidence": confidence,
                        }));
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

        // (ranking, confidence) per item id, from every journal whatever the split.
        let mut scored: HashMap<String, (Vec<usize>, f32)> = HashMap::new();
        for r in ctx.builder.journal_records("scores")? {
            let id = r["item"].as_str().unwrap_or_default().to_string();
            let top5 = r["top5"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64())
                        .map(|x| x as usize)
                        .collect()
                })
                .unwrap_or_default();
            let confidence = r["confidence"].as_f64().unwrap_or(f64::NAN) as f32;
            scored.insert(id, (top5, confidence));
        }
        let mut metrics = serde_json::Map::new();
        let mut per_class_rows: Vec<[String; 5]> = Vec::new();
        let mut confusion_rows: Vec<[String; 4]> = Vec::new();
        let mut total = 0u64;
        let mut member_scores = Vec::new();
        let mut nonmember_scores = Vec::new();
        for (name, _, role) in &sets {
            let set_items = items.iter().filter(|i| i.role == *role && &i.set == name);
            let (mut n, mut top1, mut top5) = (0u64, 0u64, 0u64);
            let mut per_class: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
            let mut confusion: BTreeMap<(&str, usize), u64> = BTreeMap::new();
            for item in set_items {
                let (ranked, confidence) = scored.get(&item.id).ok_or_else(|| {
                    NodeError::Failed(format!(
                        "node `{}`: no score journaled for {}; rerun to score it",
                        ctx.node, item.id
                    ))
                })?;
                if *role == "member" {
                    member_scores.push(*confidence);
                    continue;
                }
                if nonmember_set.as_ref() == Some(name) {
                    nonmember_scores.push(*confidence);
                }
                let truth = index_of[item.class.as_str()];
                let hit1 = ranked.first() == Some(&truth);
                let hit5 = ranked.contains(&truth);
                n += 1;
                top1 += u64::from(hit1);
                top5 += u64::from(hit5);
                let e = per_class.entry(item.class.as_str()).or_default();
                e.0 += 1;
                e.1 += u64::from(hit1);
                e.2 += u64::from(hit5);
                if let Some(&pred) = ranked.first() {
                    *confusion.entry((item.class.as_str(), pred)).or_default() += 1;
                }
            }
            if *role == "member" {
                continue;
            }
            let pct = |k: u64| {
                if n == 0 {
                    0.0
                } else {
                    100.0 * k as f64 / n as f64
                }
            };
            metrics.insert(
                name.clone(),
                serde_json::json!({
                    "top1": pct(top1),
                    "top5": pct(top5),
                    "n": n,
                    "skipped": skipped_per_set.get(name).copied().unwrap_or(0),
                }),
            );
            for (class, (count, h1, h5)) in &per_class {
                per_class_rows.push([
                    name.clone(),
                    class.to_string(),
                    count.to_string(),
                    format!("{}", 100.0 * *h1 as f64 / *count as f64),
                    format!("{}", 100.0 * *h5 as f64 / *count as f64),
                ]);
            }
            for ((truth, pred), count) in &confusion {
                let pred_name = classes
                    .get(*pred)
                    .cloned()
                    .unwrap_or_else(|| format!("output{pred}"));
                confusion_rows.push([
                    name.clone(),
                    truth.to_string(),
                    pred_name,
                    count.to_string(),
                ]);
            }
            total += n;
        }
        if let (Some(members), Some(set)) = (&members, &nonmember_set) {
            let entry = membership::record(
                ctx.out,
                &test_set_name(&members.origin),
                set,
                &member_scores,
                &nonmember_scores,
            )?;
            if let Some(serde_json::Value::Object(m)) = metrics.get_mut(set) {
                m.insert("membership".into(), entry);
            }
        }
        let metrics_path = ctx.out.join("metrics.json");
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(metrics))
            .map_err(|e| NodeError::Failed(e.to_string()))?;
        std::fs::write(&metrics_path, text + "\n").map_err(NodeError::io(&metrics_path))?;
        let csv_error = |e: crate::data::DataError| NodeError::Failed(e.to_string());
        write_csv(
            &ctx.out.join("per_class.csv"),
            &["set", "class", "n", "top1", "top5"],
            per_class_rows,
        )
        .map_err(csv_error)?;
        write_csv(
            &ctx.out.join("confusion.csv"),
            &["set", "true", "predicted", "count"],
            confusion_rows,
        )
        .map_err(csv_error)?;
        let mut summary = RunSummary::default();
        summary.counts.insert("images".into(), total);
        Ok(summary)
    }
}
