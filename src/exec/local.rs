//! The local executor: one process, nodes in topological order, each node using the threads and
//! devices it is given.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::cache::{Acquired, Cache, EntryMeta};
use crate::config::Experiment;
use crate::nodes::{Artifact, NodeError, RunContext, RunSettings};
use crate::plan::{Plan, PlannedInput};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run only this node (by name) and what it needs.
    pub only: Option<String>,
    /// Run only this variant (id or index).
    pub variant: Option<String>,
}

#[derive(Debug, Default)]
pub struct RunReport {
    pub ran: usize,
    pub cached: usize,
    pub failed: usize,
    pub skipped: usize,
    /// (node name, error) for each failure, in order.
    pub failures: Vec<(String, String)>,
}

impl RunReport {
    /// The one summary line scripts read: `ran N · cached M · failed F`.
    pub fn summary_line(&self) -> String {
        format!(
            "ran {} · cached {} · failed {}",
            self.ran, self.cached, self.failed
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("no variant `{0}`; variants: {1}")]
    Variant(String, String),
    #[error("no node `{0}`; nodes: {1}")]
    Node(String, String),
}

/// Indices of the planned nodes selected by `--variant` / `--only`, in topological order.
pub fn select(exp: &Experiment, plan: &Plan, opts: &RunOptions) -> Result<Vec<usize>, SelectError> {
    let variants: Vec<usize> = match &opts.variant {
        None => (0..exp.variants.len()).collect(),
        Some(sel) => {
            let v = exp.variant(sel).ok_or_else(|| {
                SelectError::Variant(
                    sel.clone(),
                    exp.variants
                        .iter()
                        .map(|v| v.id())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })?;
            vec![exp
                .variants
                .iter()
                .position(|x| std::ptr::eq(x, v))
                .unwrap()]
        }
    };
    let mut chosen = vec![false; plan.nodes.len()];
    for vi in variants {
        let names = &plan.variant_nodes[vi];
        match &opts.only {
            None => names.values().for_each(|&i| chosen[i] = true),
            Some(node) => {
                let &i = names.get(node).ok_or_else(|| {
                    SelectError::Node(
                        node.clone(),
                        names.keys().cloned().collect::<Vec<_>>().join(", "),
                    )
                })?;
                for a in plan.ancestors(i) {
                    chosen[a] = true;
                }
            }
        }
    }
    Ok((0..plan.nodes.len()).filter(|i| chosen[*i]).collect())
}

/// Runs the selected nodes. Never stops at the first failure: independent branches still run.
pub fn run_local(
    exp: &Experiment,
    plan: &Plan,
    cache: &Cache,
    selected: &[usize],
    settings: &RunSettings,
) -> RunReport {
    let mut report = RunReport::default();
    let mut blocked = vec![false; plan.nodes.len()];
    for &i in selected {
        let node = &plan.nodes[i];
        let label = format!(
            "{} ({}, {})",
            node.name(),
            node.kind.name(),
            node.short_key()
        );
        if blocked[i] {
            tracing::warn!("skipped {label}: an input failed");
            report.skipped += 1;
            continue;
        }
        let outcome = run_one(exp, plan, cache, i, settings);
        match outcome {
            Ok(true) => {
                tracing::info!("cached {label}");
                report.cached += 1;
                plan.remember(exp, cache, i);
            }
            Ok(false) => {
                tracing::info!("done {label}");
                report.ran += 1;
                plan.remember(exp, cache, i);
            }
            Err(e) => {
                tracing::error!("failed {label}: {e}");
                report.failed += 1;
                report
                    .failures
                    .push((node.name().to_string(), e.to_string()));
                for d in plan.descendants(i) {
                    blocked[d] = true;
                }
            }
        }
    }
    report
}

/// Ok(true): found cached (possibly finished meanwhile by another process). Ok(false): computed.
fn run_one(
    exp: &Experiment,
    plan: &Plan,
    cache: &Cache,
    i: usize,
    settings: &RunSettings,
) -> Result<bool, NodeError> {
    let node = &plan.nodes[i];
    if cache.get(node.kind.name(), &node.key)?.is_some() {
        return Ok(true);
    }
    let builder = match cache.acquire(node.kind.name(), &node.key)? {
        Acquired::Cached(_) => return Ok(true),
        Acquired::Build(b) => b,
    };
    let mut inputs: BTreeMap<String, Vec<Artifact>> = BTreeMap::new();
    for (slot, list) in &node.inputs {
        for input in list {
            let artifact = match input {
                PlannedInput::Node(j) => {
                    let up = &plan.nodes[*j];
                    Artifact {
                        ty: up.kind.output(),
                        dir: cache.entry_dir(up.kind.name(), &up.key),
                        origin: format!("node {}", up.name()),
                        classes: upstream_classes(plan, *j),
                    }
                }
                PlannedInput::Split {
                    dataset,
                    split,
                    dir,
                    classes,
                } => Artifact {
                    ty: crate::nodes::ArtifactType::Images,
                    dir: dir.clone(),
                    origin: format!("dataset {dataset}.{split}"),
                    classes: classes.clone(),
                },
            };
            inputs.entry(slot.clone()).or_default().push(artifact);
        }
    }
    let started = SystemTime::now();
    let clock = Instant::now();
    let out = builder.dir().to_path_buf();
    let mut ctx = RunContext {
        node: node.name(),
        params: &node.params,
        inputs,
        models: node.models.clone(),
        out: &out,
        builder: &builder,
        seed: exp.seed,
        settings,
        experiment_dir: &exp.dir,
    };
    tracing::info!("running {} ({})", node.name(), node.kind.name());
    let summary = node.kind.run(&mut ctx)?;
    let unix = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let meta = EntryMeta {
        kind: node.kind.name().to_string(),
        key: node.key.clone(),
        node: node.name().to_string(),
        key_fields: serde_json::to_value(&node.fields).unwrap(),
        started_unix: unix(started),
        finished_unix: unix(SystemTime::now()),
        elapsed_secs: clock.elapsed().as_secs_f64(),
        cip_version: env!("CARGO_PKG_VERSION").to_string(),
        counts: summary.counts,
        extra: summary.extra,
    };
    builder.commit(meta)?;
    Ok(false)
}

/// Class files travel with the data: a node fed by a dataset split (directly or through other
/// nodes) sees that dataset's class file.
fn upstream_classes(plan: &Plan, index: usize) -> Option<std::path::PathBuf> {
    for list in plan.nodes[index].inputs.values() {
        for input in list {
            match input {
                PlannedInput::Split {
                    classes: Some(c), ..
                } => return Some(c.clone()),
                PlannedInput::Node(j) => {
                    if let Some(c) = upstream_classes(plan, *j) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
    }
    None
}
