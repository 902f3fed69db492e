//! The plan: every variant's nodes keyed (blake3), and the physical DAG (petgraph) of UNIQUE keys.
//!
//! Variants that resolve a node to the same key share it: the caption node of a class-name vs
//! caption sweep is one physical node, run once. Plans also explain themselves: for a node that
//! will run, the key fields that changed since the last entry recorded under its name.

pub mod fingerprint;
pub mod key;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;

use crate::cache::{Cache, EntryState, NameRecord};
use crate::config::{Experiment, Ref};
use crate::nodes::{ArtifactType, NodeKind};
pub use key::{KeyFields, KEY_SCHEMA};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{}", .0.join("\n"))]
    MissingInputs(Vec<String>),
}

/// Where a planned node's input comes from.
#[derive(Debug, Clone)]
pub enum PlannedInput {
    /// Another planned node, by index into [`Plan::nodes`].
    Node(usize),
    /// A dataset split on disk.
    Split {
        dataset: String,
        split: String,
        dir: PathBuf,
        classes: Option<PathBuf>,
    },
}

/// One unique (kind, key) node.
pub struct PlannedNode {
    pub kind: &'static dyn NodeKind,
    pub key: String,
    pub fields: KeyFields,
    /// All parameters, speed-only ones included (they reach the node, not the key).
    pub params: serde_json::Value,
    pub inputs: BTreeMap<String, Vec<PlannedInput>>,
    pub models: BTreeMap<String, crate::nodes::ModelInput>,
    /// (variant index, node name) pairs that resolve to this node.
    pub uses: Vec<(usize, String)>,
    /// Missing datasets, models or files this node needs, directly or upstream (e.g.
    /// `dataset imagenette.train`). Non-empty only in a plan built with [`Plan::build_all`]; the
    /// key is then provisional, since it stands on a placeholder for the missing content.
    pub missing: Vec<String>,
}

impl PlannedNode {
    /// The first name it goes by, for messages.
    pub fn name(&self) -> &str {
        &self.uses[0].1
    }
    pub fn short_key(&self) -> &str {
        &self.key[..12]
    }
}

pub struct Plan {
    /// In topological order: inputs before their consumers.
    pub nodes: Vec<PlannedNode>,
    pub graph: DiGraph<usize, ()>,
    /// Per variant: node name -> index into `nodes`.
    pub variant_nodes: Vec<BTreeMap<String, usize>>,
}

impl Plan {
    /// Keys every node of every variant. Missing datasets or models are collected and reported
    /// together, each with the command that provides it.
    pub fn build(exp: &Experiment) -> Result<Plan, PlanError> {
        let (plan, problems) = Plan::build_all(exp);
        if problems.is_empty() {
            Ok(plan)
        } else {
            Err(PlanError::MissingInputs(problems))
        }
    }

    /// Plans every node even when inputs are missing, so `cip plan` can show the whole DAG of an
    /// experiment before its data and models exist. Nodes standing on a missing input carry it in
    /// `missing`; the problems come back as messages naming the command that provides each input.
    pub fn build_all(exp: &Experiment) -> (Plan, Vec<String>) {
        let mut problems = Vec::new();
        let mut split_fp: HashMap<(String, String), (String, PathBuf, Option<PathBuf>)> =
            HashMap::new();
        // Inputs that are absent, by what a node refers to; their placeholder digests keep the
        // keys computable (never cached: no entry can exist under a placeholder's key).
        let mut missing_splits: HashMap<(String, String), String> = HashMap::new();
        let mut missing_models: HashMap<String, String> = HashMap::new();
        for ds in exp.datasets.values() {
            let root = exp.resolve_path(&ds.root);
            let classes = ds.classes.as_ref().map(|c| exp.resolve_path(c));
            for split in &ds.splits {
                let dir = root.join(split);
                match fingerprint::dataset_split(&dir, classes.as_deref(), ds.deep_fingerprint) {
                    Ok(fp) => {
                        split_fp
                            .insert((ds.name.clone(), split.clone()), (fp, dir, classes.clone()));
                    }
                    Err(e) if used_split(exp, &ds.name, split) => {
                        missing_splits.insert(
                            (ds.name.clone(), split.clone()),
                            format!("dataset {}.{split}", ds.name),
                        );
                        split_fp.insert(
                            (ds.name.clone(), split.clone()),
                            (
                                format!("missing:{}.{split}", ds.name),
                                dir.clone(),
                                classes.clone(),
                            ),
                        );
                        let hint = ds.prepare.as_deref().map(prepare_hint).unwrap_or_else(|| {
                            format!("prepare it with `cip data` (see `cip data --help`) or fix `root` in [datasets.{}]", ds.name)
                        });
                        problems.push(format!(
                            "{}: dataset `{}` split `{split}`: {e}\n  help: {hint}",
                            exp.file.display(),
                            ds.name
                        ));
                    }
                    Err(_) => {}
                }
            }
        }
        let mut model_digest: HashMap<String, String> = HashMap::new();
        for m in exp.models.values() {
            if !exp.variants.iter().any(|v| {
                v.nodes
                    .iter()
                    .any(|n| n.models.values().any(|x| x == &m.name))
            }) {
                continue;
            }
            let dir = exp.resolve_path(&m.path);
            match fingerprint::model_digest(&dir) {
                Ok(d) => {
                    model_digest.insert(m.name.clone(), d);
                }
                Err(e) => {
                    missing_models.insert(m.name.clone(), format!("model {}", m.name));
                    model_digest.insert(m.name.clone(), format!("missing:{}", m.name));
                    let hint = m.prepare.as_deref().map(prepare_hint).unwrap_or_else(|| {
                        format!(
                            "export it with `python models/export.py {} --out {}` (see models/README.md)",
                            m.family,
                            m.path.display()
                        )
                    });
                    problems.push(format!(
                        "{}: model `{}` ({}): {e}\n  help: {hint}",
                        exp.file.display(),
                        m.name,
                        m.family
                    ));
                }
            }
        }
        let mut file_fp: HashMap<PathBuf, String> = HashMap::new();

        let mut nodes: Vec<PlannedNode> = Vec::new();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        let mut variant_nodes = Vec::new();
        for (vi, variant) in exp.variants.iter().enumerate() {
            let mut names: BTreeMap<String, usize> = BTreeMap::new();
            for spec in &variant.nodes {
                let mut inputs_keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
                let mut inputs: BTreeMap<String, Vec<PlannedInput>> = BTreeMap::new();
                let mut missing: Vec<String> = Vec::new();
                for (slot, refs) in &spec.inputs {
                    for r in refs {
                        let (text, input) = match r {
                            Ref::Node(n) => {
                                let i = names[n];
                                missing.extend(nodes[i].missing.iter().cloned());
                                (
                                    format!("node:{}:{}", nodes[i].kind.name(), nodes[i].key),
                                    PlannedInput::Node(i),
                                )
                            }
                            Ref::Split { dataset, split } => {
                                if let Some(m) =
                                    missing_splits.get(&(dataset.clone(), split.clone()))
                                {
                                    missing.push(m.clone());
                                }
                                let (fp, dir, classes) =
                                    split_fp[&(dataset.clone(), split.clone())].clone();
                                (
                                    format!("dataset:{fp}"),
                                    PlannedInput::Split {
                                        dataset: dataset.clone(),
                                        split: split.clone(),
                                        dir,
                                        classes,
                                    },
                                )
                            }
                        };
                        inputs_keys.entry(slot.clone()).or_default().push(text);
                        inputs.entry(slot.clone()).or_default().push(input);
                    }
                }
                let mut models = BTreeMap::new();
                let mut model_keys = BTreeMap::new();
                for (slot, m) in &spec.models {
                    let ms = &exp.models[m];
                    if let Some(x) = missing_models.get(m) {
                        missing.push(x.clone());
                    }
                    model_keys.insert(slot.clone(), model_digest[m].clone());
                    models.insert(
                        slot.clone(),
                        crate::nodes::ModelInput {
                            name: m.clone(),
                            dir: exp.resolve_path(&ms.path),
                            family: ms.family.clone(),
                        },
                    );
                }
                let mut files = BTreeMap::new();
                for p in spec.kind.file_params() {
                    if let Some(path) = spec.params.get(*p).and_then(|v| v.as_str()) {
                        let full = exp.resolve_path(std::path::Path::new(path));
                        let digest = match file_fp.get(&full) {
                            Some(d) => d.clone(),
                            None => match fingerprint::file_digest(&full) {
                                Ok(d) => {
                                    file_fp.insert(full.clone(), d.clone());
                                    d
                                }
                                Err(e) => {
                                    missing.push(format!("file {}", full.display()));
                                    problems.push(format!(
                                        "{}: node `{}`: parameter `{p}` names {}: {e}\n  help: fix the path (relative paths resolve against the experiment file's folder)",
                                        exp.file.display(),
                                        spec.name,
                                        full.display()
                                    ));
                                    continue;
                                }
                            },
                        };
                        files.insert(p.to_string(), digest);
                    }
                }
                let mut key_params = spec.params.clone();
                if let Some(obj) = key_params.as_object_mut() {
                    for p in spec.kind.speed_only() {
                        obj.remove(*p);
                    }
                }
                let fields = KeyFields {
                    schema: KEY_SCHEMA,
                    kind: spec.kind.name().to_string(),
                    kind_version: spec.kind.version(),
                    params: key_params,
                    inputs: inputs_keys,
                    models: model_keys,
                    files,
                    seed: spec.kind.seeded().then_some(exp.seed),
                };
                let key = fields.key();
                missing.sort();
                missing.dedup();
                let index = match by_key.get(&key) {
                    Some(&i) => i,
                    None => {
                        nodes.push(PlannedNode {
                            kind: spec.kind,
                            key: key.clone(),
                            fields,
                            params: spec.params.clone(),
                            inputs,
                            models,
                            uses: Vec::new(),
                            missing,
                        });
                        by_key.insert(key, nodes.len() - 1);
                        nodes.len() - 1
                    }
                };
                nodes[index].uses.push((vi, spec.name.clone()));
                names.insert(spec.name.clone(), index);
            }
            variant_nodes.push(names);
        }
        // A missing file named by a parameter is reported once, not once per variant.
        let mut seen = std::collections::HashSet::new();
        problems.retain(|p| seen.insert(p.clone()));
        // Nodes were appended after their inputs within each variant, so index order is a
        // topological order; the graph is kept for traversal (descendants of a failure, --only).
        let mut graph = DiGraph::new();
        let idx: Vec<NodeIndex> = (0..nodes.len()).map(|i| graph.add_node(i)).collect();
        for (i, n) in nodes.iter().enumerate() {
            for inputs in n.inputs.values() {
                for input in inputs {
                    if let PlannedInput::Node(j) = input {
                        graph.update_edge(idx[*j], idx[i], ());
                    }
                }
            }
        }
        (
            Plan {
                nodes,
                graph,
                variant_nodes,
            },
            problems,
        )
    }

    /// The node and everything upstream of it.
    pub fn ancestors(&self, index: usize) -> Vec<usize> {
        let mut seen = vec![false; self.nodes.len()];
        let mut stack = vec![index];
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            for n in self
                .graph
                .neighbors_directed(NodeIndex::new(i), petgraph::Direction::Incoming)
            {
                stack.push(self.graph[n]);
            }
        }
        (0..self.nodes.len()).filter(|i| seen[*i]).collect()
    }

    /// Everything downstream of a node (not including it).
    pub fn descendants(&self, index: usize) -> Vec<usize> {
        let mut seen = vec![false; self.nodes.len()];
        let mut stack: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(index), petgraph::Direction::Outgoing)
            .map(|n| self.graph[n])
            .collect();
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            for n in self
                .graph
                .neighbors_directed(NodeIndex::new(i), petgraph::Direction::Outgoing)
            {
                stack.push(self.graph[n]);
            }
        }
        (0..self.nodes.len()).filter(|i| seen[*i]).collect()
    }

    /// The cache directory of a planned node's entry (complete or not).
    pub fn entry_dir(&self, cache: &Cache, index: usize) -> PathBuf {
        let n = &self.nodes[index];
        cache.entry_dir(n.kind.name(), &n.key)
    }

    /// Status of every node against the cache, with the reasons for reruns.
    pub fn status(&self, exp: &Experiment, cache: &Cache) -> Vec<NodeStatus> {
        self.nodes
            .iter()
            .map(|n| {
                let state = cache.state(n.kind.name(), &n.key);
                let (status, journal_records) = match state {
                    _ if !n.missing.is_empty() => (Status::Missing, None),
                    EntryState::Cached => (Status::Cached, None),
                    EntryState::Partial { journal_records } => {
                        (Status::Partial, Some(journal_records))
                    }
                    EntryState::Absent => (Status::Runs, None),
                };
                let mut changed = Vec::new();
                if status != Status::Cached {
                    let fields = serde_json::to_value(&n.fields).unwrap();
                    for (vi, name) in &n.uses {
                        let scope = scope(exp, *vi);
                        if let Ok(Some(last)) = cache.recall(&scope, name) {
                            changed = key::diff(&last.key_fields, &fields);
                            if !changed.is_empty() {
                                break;
                            }
                        }
                    }
                }
                NodeStatus {
                    name: n.name().to_string(),
                    kind: n.kind.name().to_string(),
                    key: n.key.clone(),
                    output: n.kind.output(),
                    status,
                    journal_records,
                    variants: n
                        .uses
                        .iter()
                        .map(|(v, _)| exp.variants[*v].id())
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                    changed,
                    missing: n.missing.clone(),
                }
            })
            .collect()
    }

    /// Records, per variant-qualified node name, the key just produced (for later "why" answers).
    pub fn remember(&self, exp: &Experiment, cache: &Cache, index: usize) {
        let n = &self.nodes[index];
        let record = NameRecord {
            kind: n.kind.name().to_string(),
            key: n.key.clone(),
            key_fields: serde_json::to_value(&n.fields).unwrap(),
        };
        for (vi, name) in &n.uses {
            if let Err(e) = cache.remember(&scope(exp, *vi), name, &record) {
                tracing::warn!("could not record the key of node {name}: {e}");
            }
        }
    }
}

/// The name under which a variant's node keys are remembered: experiment name plus variant id.
pub fn scope(exp: &Experiment, variant: usize) -> String {
    format!("{}/{}", exp.name, exp.variants[variant].id())
}

/// `prepare` is a command to run, or, starting with `see `, a pointer to instructions (for data
/// no command can fetch, such as the OOD test sets).
fn prepare_hint(prepare: &str) -> String {
    if prepare.starts_with("see ") {
        prepare.to_string()
    } else {
        format!("run `{prepare}`")
    }
}

fn used_split(exp: &Experiment, dataset: &str, split: &str) -> bool {
    exp.variants.iter().any(|v| {
        v.nodes.iter().any(|n| {
            n.inputs.values().flatten().any(
                |r| matches!(r, Ref::Split { dataset: d, split: s } if d == dataset && s == split),
            )
        })
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Cached,
    Runs,
    Partial,
    /// Waits for a dataset, model or file that does not exist yet.
    Missing,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Cached => "cached",
            Status::Runs => "runs",
            Status::Partial => "partial",
            Status::Missing => "missing",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub kind: String,
    pub key: String,
    pub output: ArtifactType,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_records: Option<u64>,
    pub variants: Vec<String>,
    pub changed: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}
