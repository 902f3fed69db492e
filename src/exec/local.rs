//! The local executor: one process, nodes in topological order, each node using the threads and
//! devices it is given.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use std::path::PathBuf;

use super::ShardQueue;
use crate::cache::{Acquired, Builder, Cache, EntryMeta, ShardAcquired, ShardSpec};
use crate::config::Experiment;
use crate::nodes::{Artifact, NodeError, RunContext, RunSettings, RunSummary};
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

/// Shards per device when a node runs on several devices: more shards than workers, so a worker
/// that finishes early takes over work (shards are pulled, not assigned).
pub const SHARDS_PER_DEVICE: u32 = 4;

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
    // The entry lock makes this process the only builder; it also waits for running shards of
    // the entry (other processes) to finish, so this run finalises whatever they journaled.
    let builder = match cache.acquire(node.kind.name(), &node.key)? {
        Acquired::Cached(_) => return Ok(true),
        Acquired::Build(b) => b,
    };
    let started = SystemTime::now();
    let clock = Instant::now();
    tracing::info!("running {} ({})", node.name(), node.kind.name());
    if node.kind.journaled() && settings.devices.len() > 1 {
        run_on_devices(exp, plan, cache, i, settings, &builder)?;
    }
    // Unsharded, this run does the whole node; after shards it computes what they left (nothing
    // when they all finished) and writes the final output from all journals.
    let summary = run_node(exp, plan, cache, i, settings, &builder, None)?;
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

/// One worker thread per device, each with its own sessions, pulling shards from one queue.
/// Returns the first worker error once every worker has stopped.
fn run_on_devices(
    exp: &Experiment,
    plan: &Plan,
    cache: &Cache,
    i: usize,
    settings: &RunSettings,
    builder: &Builder,
) -> Result<(), NodeError> {
    let devices = &settings.devices;
    let queue = ShardQueue::all(
        devices.len() as u32 * SHARDS_PER_DEVICE,
        settings.show_progress,
    );
    let cpu_workers = devices
        .iter()
        .filter(|d| d.as_str() == "cpu")
        .count()
        .max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    tracing::info!(
        "{}: {} shards over devices {}",
        plan.nodes[i].name(),
        devices.len() as u32 * SHARDS_PER_DEVICE,
        devices.join(",")
    );
    std::thread::scope(|scope| {
        let workers: Vec<_> = devices
            .iter()
            .map(|device| {
                let worker_settings = RunSettings {
                    provider: device.clone(),
                    // CPU workers split the cores instead of each taking all of them.
                    threads: match (settings.threads, device.as_str()) {
                        (0, "cpu") => (cores / cpu_workers).max(1),
                        (t, _) => t,
                    },
                    devices: Vec::new(),
                    show_progress: settings.show_progress,
                    engine_cache: settings.engine_cache.clone(),
                };
                let queue = &queue;
                scope.spawn(move || {
                    run_node(exp, plan, cache, i, &worker_settings, builder, Some(queue))
                })
            })
            .collect();
        let mut first_error = None;
        for worker in workers {
            match worker.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        first_error.map_or(Ok(()), Err)
    })
}

/// The inputs of planned node `i` as artifacts in the cache.
fn node_inputs(plan: &Plan, cache: &Cache, i: usize) -> BTreeMap<String, Vec<Artifact>> {
    let node = &plan.nodes[i];
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
    inputs
}

/// Runs node `i`'s kind into `builder`'s partial directory: the whole node, or as a worker on
/// `shards`.
fn run_node(
    exp: &Experiment,
    plan: &Plan,
    cache: &Cache,
    i: usize,
    settings: &RunSettings,
    builder: &Builder,
    shards: Option<&ShardQueue>,
) -> Result<RunSummary, NodeError> {
    let node = &plan.nodes[i];
    let out = builder.dir().to_path_buf();
    let mut ctx = RunContext {
        node: node.name(),
        params: &node.params,
        inputs: node_inputs(plan, cache, i),
        models: node.models.clone(),
        out: &out,
        builder,
        seed: exp.seed,
        settings,
        experiment_dir: &exp.dir,
        shards,
    };
    node.kind.run(&mut ctx)
}

/// What [`run_shard`] did.
#[derive(Debug)]
pub enum ShardOutcome {
    /// The shard journaled all its items; its completion marker is at this path.
    Done(PathBuf),
    /// The entry was already complete.
    AlreadyComplete,
    /// A node that is not item-parallel ran whole and committed its entry.
    Committed,
}

/// `cip shard`: runs shard `spec` of planned node `i` against the cache. Shards of one entry run
/// concurrently (each holds its own shard lock); a shard waits while the entry lock is held
/// (by a finaliser or a whole-node run) and ends as soon as the entry is complete. A node kind
/// that is not journaled cannot be split and runs whole with `count` 1.
pub fn run_shard(
    exp: &Experiment,
    plan: &Plan,
    cache: &Cache,
    i: usize,
    spec: ShardSpec,
    settings: &RunSettings,
) -> Result<ShardOutcome, NodeError> {
    let node = &plan.nodes[i];
    for input in node.inputs.values().flatten() {
        if let PlannedInput::Node(j) = input {
            let up = &plan.nodes[*j];
            if cache.get(up.kind.name(), &up.key)?.is_none() {
                return Err(NodeError::Failed(format!(
                    "node `{}`: its input node `{}` ({}/{}) is not in the cache yet; run it first \
                     (`cip run FILE --only {}`)",
                    node.name(),
                    up.name(),
                    up.kind.name(),
                    up.short_key(),
                    up.name()
                )));
            }
        }
    }
    if !node.kind.journaled() {
        if spec.count != 1 {
            return Err(NodeError::Failed(format!(
                "node `{}` (kind {}) is not item-parallel and cannot be split: run it with \
                 --count 1",
                node.name(),
                node.kind.name()
            )));
        }
        let settings = RunSettings {
            devices: Vec::new(),
            ..settings.clone()
        };
        return Ok(match run_one(exp, plan, cache, i, &settings)? {
            true => ShardOutcome::AlreadyComplete,
            false => ShardOutcome::Committed,
        });
    }
    let mut announced = false;
    loop {
        match cache.acquire_shard(node.kind.name(), &node.key, spec)? {
            ShardAcquired::Cached(_) => return Ok(ShardOutcome::AlreadyComplete),
            ShardAcquired::Busy(status) => {
                if !announced {
                    tracing::info!(
                        "{} {spec}: the entry is locked by {}; waiting",
                        node.name(),
                        status.describe_holder()
                    );
                    announced = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            ShardAcquired::Build(builder) => {
                // A resubmitted or duplicate task of a shard that already finished.
                if cache.shard_done(node.kind.name(), &node.key, spec) {
                    return Ok(ShardOutcome::Done(cache.shard_marker(
                        node.kind.name(),
                        &node.key,
                        spec,
                    )));
                }
                #[cfg(feature = "test-kinds")]
                test_hooks::fail_shard(cache, node.name(), node.kind.name(), &node.key, spec)?;
                let queue = ShardQueue::of([spec], settings.show_progress);
                run_node(exp, plan, cache, i, settings, &builder, Some(&queue))?;
                return Ok(ShardOutcome::Done(builder.mark_shard_done(cache)?));
            }
        }
    }
}

/// Finalises planned node `i`: merges the journals of its shards, writes its outputs and commits
/// the entry (computing here whatever the shards left undone). Ok(true) when it was complete.
pub fn finalize(
    exp: &Experiment,
    plan: &Plan,
    cache: &Cache,
    i: usize,
    settings: &RunSettings,
) -> Result<bool, NodeError> {
    let settings = RunSettings {
        devices: Vec::new(),
        ..settings.clone()
    };
    run_one(exp, plan, cache, i, &settings)
}

/// The planned node named `node` in variant `variant` (id or index; the first variant when
/// None).
pub fn find_node(
    exp: &Experiment,
    plan: &Plan,
    node: &str,
    variant: Option<&str>,
) -> Result<usize, SelectError> {
    let opts = RunOptions {
        only: Some(node.to_string()),
        variant: Some(variant.unwrap_or("0").to_string()),
    };
    // `select` validates both names and lists the alternatives.
    select(exp, plan, &opts)?;
    let v = exp
        .variant(variant.unwrap_or("0"))
        .expect("select checked the variant");
    let vi = exp
        .variants
        .iter()
        .position(|x| std::ptr::eq(x, v))
        .expect("a variant of the experiment");
    Ok(plan.variant_nodes[vi][node])
}

#[cfg(feature = "test-kinds")]
mod test_hooks {
    use super::*;

    /// Test hook (only in builds with `test-kinds`): `CIP_TEST_FAIL_SHARD=NODE:INDEX:TIMES` makes
    /// shard INDEX of node NODE fail its first TIMES attempts, counted in the shard directory.
    pub(super) fn fail_shard(
        cache: &Cache,
        name: &str,
        kind: &str,
        key: &str,
        spec: ShardSpec,
    ) -> Result<(), NodeError> {
        let Ok(setting) = std::env::var("CIP_TEST_FAIL_SHARD") else {
            return Ok(());
        };
        let parts: Vec<&str> = setting.split(':').collect();
        let [node, index, times] = parts[..] else {
            return Ok(());
        };
        if node != name || index.parse::<u32>().ok() != Some(spec.index) {
            return Ok(());
        }
        let times: u32 = times.parse().unwrap_or(0);
        let counter = cache
            .shards_dir(kind, key)
            .join(format!("{}-of-{}.test-failures", spec.index, spec.count));
        let failed: u32 = std::fs::read_to_string(&counter)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if failed >= times {
            return Ok(());
        }
        std::fs::write(&counter, (failed + 1).to_string()).map_err(NodeError::io(&counter))?;
        Err(NodeError::Failed(format!(
            "{name} {spec}: failing on purpose (CIP_TEST_FAIL_SHARD, failure {} of {times})",
            failed + 1
        )))
    }
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
