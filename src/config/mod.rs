//! Experiment files: raw TOML -> a resolved, validated [`Experiment`] with one [`Variant`] per point
//! of the sweep.
//!
//! Resolution is strict: every key must be known (with a "did you mean" for typos), every reference
//! must resolve, artifact types must match the slot they feed, and the graph must be acyclic. All
//! errors carry `file:line:col` from a spanned parse of the same text.

mod diagnostic;
mod sweep;

pub use diagnostic::{closest, suggest, Diagnostic, Diagnostics, SourceMap};
pub use sweep::{Axis, AxisValue};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use petgraph::algo::tarjan_scc;
use petgraph::graph::DiGraph;

use crate::nodes::{self, ArtifactType, NodeKind};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read experiment file {path}: {source}\n  help: check the path; experiment files live under experiments/")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Diagnostics),
}

/// A dataset: an ImageFolder root with named splits (`<root>/<split>/<class>/<image>`).
#[derive(Debug, Clone)]
pub struct DatasetSpec {
    pub name: String,
    pub root: PathBuf,
    pub splits: Vec<String>,
    /// Class file: folder id -> prompt name.
    pub classes: Option<PathBuf>,
    /// Opt-in content hash instead of the (path, size, mtime) listing.
    pub deep_fingerprint: bool,
    /// The command that provides this data, quoted in "missing input" errors.
    pub prepare: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub path: PathBuf,
    pub family: String,
    pub prepare: Option<String>,
}

/// Where a node input comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ref {
    Node(String),
    Split { dataset: String, split: String },
}

impl std::fmt::Display for Ref {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ref::Node(n) => write!(f, "{n}"),
            Ref::Split { dataset, split } => write!(f, "{dataset}.{split}"),
        }
    }
}

/// A node with its kind, its resolved references and its parameters (defaults filled in).
#[derive(Clone)]
pub struct NodeSpec {
    pub name: String,
    pub kind: &'static dyn NodeKind,
    pub inputs: BTreeMap<String, Vec<Ref>>,
    pub models: BTreeMap<String, String>,
    /// Every parameter, defaults filled in, canonical JSON.
    pub params: serde_json::Value,
}

impl std::fmt::Debug for NodeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSpec")
            .field("name", &self.name)
            .field("kind", &self.kind.name())
            .field("inputs", &self.inputs)
            .field("models", &self.models)
            .field("params", &self.params)
            .finish()
    }
}

/// One point of the sweep: a full set of nodes in topological order.
#[derive(Debug, Clone)]
pub struct Variant {
    /// `axis=value` pairs in axis order; empty when there is no sweep.
    pub labels: Vec<(String, String)>,
    pub nodes: Vec<NodeSpec>,
}

impl Variant {
    /// `guidance=1.5,prompt=cip`, or `default` without a sweep.
    pub fn id(&self) -> String {
        if self.labels.is_empty() {
            return "default".to_string();
        }
        self.labels
            .iter()
            .map(|(a, v)| format!("{a}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    pub provider: String,
    pub threads: usize,
    pub devices: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ReportSpec {
    /// Eval nodes whose metrics form the table.
    pub eval: Vec<String>,
    /// Metric names shown per test set (e.g. top1).
    pub metrics: Vec<String>,
    pub reference_label: Option<String>,
    /// Reference numbers by variant id.
    pub reference: BTreeMap<String, f64>,
}

#[derive(Debug, Clone)]
pub struct Experiment {
    pub name: String,
    pub file: PathBuf,
    /// Relative paths in the file resolve against this directory.
    pub dir: PathBuf,
    pub seed: u64,
    pub datasets: IndexMap<String, DatasetSpec>,
    pub models: IndexMap<String, ModelSpec>,
    pub axes: Vec<Axis>,
    pub variants: Vec<Variant>,
    pub report: ReportSpec,
    pub run: RunSpec,
}

const TOP_KEYS: &[&str] = &[
    "experiment",
    "run",
    "datasets",
    "models",
    "nodes",
    "sweep",
    "report",
];
const EXPERIMENT_KEYS: &[&str] = &["name", "seed", "description"];
const RUN_KEYS: &[&str] = &["provider", "threads", "devices"];
const DATASET_KEYS: &[&str] = &["root", "splits", "classes", "fingerprint", "prepare"];
const MODEL_KEYS: &[&str] = &["path", "family", "prepare"];
const REPORT_KEYS: &[&str] = &["eval", "metrics", "reference", "reference_label"];
pub const MODEL_FAMILIES: &[&str] = &["sd", "blip2", "vit-gpt2", "classifier"];

impl Experiment {
    pub fn load(path: &Path) -> Result<Experiment, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Experiment, ConfigError> {
        let map = SourceMap::new(path, text);
        let doc: toml::Table = match toml::from_str(text) {
            Ok(t) => t,
            Err(e) => {
                let message = e.message().trim_end().to_string();
                let d = map
                    .at_span(e.span(), format!("malformed TOML: {message}"))
                    .help("fix the syntax at this position (TOML reference: https://toml.io)");
                return Err(ConfigError::Invalid(Diagnostics(vec![d])));
            }
        };
        let mut r = Resolver {
            map: &map,
            errors: Vec::new(),
        };
        let exp = r.experiment(path, &doc);
        match exp {
            Some(e) if r.errors.is_empty() => Ok(e),
            _ => Err(ConfigError::Invalid(Diagnostics(r.errors))),
        }
    }

    pub fn resolve_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// Selects variants by id or by 0-based index.
    pub fn variant(&self, selector: &str) -> Option<&Variant> {
        if let Ok(i) = selector.parse::<usize>() {
            return self.variants.get(i);
        }
        self.variants.iter().find(|v| v.id() == selector)
    }
}

struct Resolver<'m, 's> {
    map: &'m SourceMap<'s>,
    errors: Vec<Diagnostic>,
}

impl Resolver<'_, '_> {
    fn push(&mut self, d: Diagnostic) {
        self.errors.push(d);
    }

    fn unknown_keys(&mut self, table: &toml::Table, path: &[&str], valid: &[&str], what: &str) {
        for key in table.keys() {
            if !valid.contains(&key.as_str()) {
                let mut p = path.to_vec();
                p.push(key);
                let d = self
                    .map
                    .at_key(&p, format!("unknown key `{key}` in {what}"))
                    .help(suggest(key, valid));
                self.push(d);
            }
        }
    }

    fn table<'t>(&mut self, doc: &'t toml::Table, path: &[&str]) -> Option<&'t toml::Table> {
        let key = *path.last().unwrap();
        match doc.get(key) {
            None => None,
            Some(toml::Value::Table(t)) => Some(t),
            Some(other) => {
                let d = self.map.at_value(
                    path,
                    format!("`{key}` must be a table, found {}", other.type_str()),
                );
                self.push(d);
                None
            }
        }
    }

    fn string(&mut self, t: &toml::Table, path: &[&str], required: bool) -> Option<String> {
        let key = *path.last().unwrap();
        match t.get(key) {
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(other) => {
                let d = self.map.at_value(
                    path,
                    format!("`{key}` must be a string, found {}", other.type_str()),
                );
                self.push(d);
                None
            }
            None if required => {
                let parent = &path[..path.len() - 1];
                let d = self
                    .map
                    .at_key(
                        parent,
                        format!("missing required key `{key}` in `{}`", parent.join(".")),
                    )
                    .help(format!("add `{key} = ...` to this table"));
                self.push(d);
                None
            }
            None => None,
        }
    }

    fn string_list(&mut self, t: &toml::Table, path: &[&str]) -> Option<Vec<String>> {
        let key = *path.last().unwrap();
        match t.get(key) {
            None => None,
            Some(toml::Value::String(s)) => Some(vec![s.clone()]),
            Some(toml::Value::Array(a)) => {
                let mut out = Vec::new();
                for v in a {
                    match v {
                        toml::Value::String(s) => out.push(s.clone()),
                        other => {
                            let d = self.map.at_value(
                                path,
                                format!("`{key}` must list strings, found {}", other.type_str()),
                            );
                            self.push(d);
                            return None;
                        }
                    }
                }
                Some(out)
            }
            Some(other) => {
                let d = self.map.at_value(
                    path,
                    format!(
                        "`{key}` must be a string or a list of strings, found {}",
                        other.type_str()
                    ),
                );
                self.push(d);
                None
            }
        }
    }

    fn experiment(&mut self, file: &Path, doc: &toml::Table) -> Option<Experiment> {
        self.unknown_keys(doc, &[], TOP_KEYS, "the experiment file");
        let dir = file
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."))
            .to_path_buf();

        let mut name = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "experiment".into());
        let mut seed = 0u64;
        if let Some(t) = self.table(doc, &["experiment"]) {
            self.unknown_keys(t, &["experiment"], EXPERIMENT_KEYS, "[experiment]");
            if let Some(n) = self.string(t, &["experiment", "name"], false) {
                name = n;
            }
            match t.get("seed") {
                None => {}
                Some(toml::Value::Integer(i)) if *i >= 0 => seed = *i as u64,
                Some(other) => {
                    let d = self.map.at_value(
                        &["experiment", "seed"],
                        format!("`seed` must be a non-negative integer, found {other}"),
                    );
                    self.push(d);
                }
            }
        }

        let run = self.run_spec(doc);
        let datasets = self.datasets(doc);
        let models = self.models(doc);
        let raw_nodes = self.raw_nodes(doc);
        if self.errors.is_empty() {
            self.raw_cycles(&raw_nodes);
        }
        let axes = self.axes(doc, &raw_nodes);
        let report = self.report(doc, &raw_nodes);
        if !self.errors.is_empty() {
            return None;
        }

        let mut variants = Vec::new();
        for (labels, overrides) in sweep::expand(&axes) {
            match self.variant(&raw_nodes, &overrides, &datasets, &models) {
                Some(nodes) => variants.push(Variant { labels, nodes }),
                None => return None,
            }
        }
        Some(Experiment {
            name,
            file: file.to_path_buf(),
            dir,
            seed,
            datasets,
            models,
            axes,
            variants,
            report,
            run,
        })
    }

    fn run_spec(&mut self, doc: &toml::Table) -> RunSpec {
        let mut spec = RunSpec {
            provider: "cpu".into(),
            threads: 0,
            devices: Vec::new(),
        };
        if let Some(t) = self.table(doc, &["run"]) {
            self.unknown_keys(t, &["run"], RUN_KEYS, "[run]");
            if let Some(p) = self.string(t, &["run", "provider"], false) {
                spec.provider = p;
            }
            if let Some(toml::Value::Integer(n)) = t.get("threads") {
                spec.threads = (*n).max(0) as usize;
            }
            if let Some(d) = self.string_list(t, &["run", "devices"]) {
                spec.devices = d;
            }
        }
        spec
    }

    fn datasets(&mut self, doc: &toml::Table) -> IndexMap<String, DatasetSpec> {
        let mut out = IndexMap::new();
        let Some(t) = self.table(doc, &["datasets"]) else {
            return out;
        };
        for (name, v) in t {
            let path = ["datasets", name.as_str()];
            let Some(ds) = v.as_table() else {
                let d = self
                    .map
                    .at_key(&path, format!("dataset `{name}` must be a table"));
                self.push(d.help(format!("write it as [datasets.{name}] with root = \"...\"")));
                continue;
            };
            self.unknown_keys(ds, &path, DATASET_KEYS, &format!("dataset `{name}`"));
            let root = self.string(ds, &["datasets", name, "root"], true);
            let splits = self
                .string_list(ds, &["datasets", name, "splits"])
                .unwrap_or_else(|| vec!["train".into(), "val".into()]);
            let classes = self
                .string(ds, &["datasets", name, "classes"], false)
                .map(PathBuf::from);
            let prepare = self.string(ds, &["datasets", name, "prepare"], false);
            let deep = match self
                .string(ds, &["datasets", name, "fingerprint"], false)
                .as_deref()
            {
                None | Some("stat") => false,
                Some("content") => true,
                Some(other) => {
                    let d = self
                        .map
                        .at_value(&["datasets", name, "fingerprint"], format!("unknown fingerprint mode `{other}`"))
                        .help("use \"stat\" (path, size, mtime; the default) or \"content\" (hash every file)");
                    self.push(d);
                    false
                }
            };
            if let Some(root) = root {
                out.insert(
                    name.clone(),
                    DatasetSpec {
                        name: name.clone(),
                        root: PathBuf::from(root),
                        splits,
                        classes,
                        deep_fingerprint: deep,
                        prepare,
                    },
                );
            }
        }
        out
    }

    fn models(&mut self, doc: &toml::Table) -> IndexMap<String, ModelSpec> {
        let mut out = IndexMap::new();
        let Some(t) = self.table(doc, &["models"]) else {
            return out;
        };
        for (name, v) in t {
            let path = ["models", name.as_str()];
            let Some(m) = v.as_table() else {
                let d = self
                    .map
                    .at_key(&path, format!("model `{name}` must be a table"));
                self.push(d.help(format!("write it as [models.{name}] with path and family")));
                continue;
            };
            self.unknown_keys(m, &path, MODEL_KEYS, &format!("model `{name}`"));
            let p = self.string(m, &["models", name, "path"], true);
            let family = self.string(m, &["models", name, "family"], true);
            let prepare = self.string(m, &["models", name, "prepare"], false);
            if let Some(f) = &family {
                if !MODEL_FAMILIES.contains(&f.as_str()) {
                    let d = self
                        .map
                        .at_value(
                            &["models", name, "family"],
                            format!("unknown model family `{f}`"),
                        )
                        .help(suggest(f, MODEL_FAMILIES));
                    self.push(d);
                }
            }
            if let (Some(p), Some(family)) = (p, family) {
                out.insert(
                    name.clone(),
                    ModelSpec {
                        name: name.clone(),
                        path: PathBuf::from(p),
                        family,
                        prepare,
                    },
                );
            }
        }
        out
    }

    /// Node tables with their kind checked and their keys sorted into slots and parameters.
    fn raw_nodes(&mut self, doc: &toml::Table) -> IndexMap<String, RawNode> {
        let mut out = IndexMap::new();
        let Some(t) = self.table(doc, &["nodes"]) else {
            let d = self
                .map
                .at_key(&[], "the experiment declares no nodes")
                .help("add at least one [nodes.NAME] table with a `kind`");
            self.push(d);
            return out;
        };
        let kinds: Vec<&str> = nodes::registry().iter().map(|k| k.name()).collect();
        for (name, v) in t {
            let path = ["nodes", name.as_str()];
            if name.contains('.') {
                let d = self
                    .map
                    .at_key(&path, format!("node name `{name}` contains a dot"))
                    .help("dots separate dataset and split in references; rename the node");
                self.push(d);
                continue;
            }
            let Some(table) = v.as_table() else {
                let d = self
                    .map
                    .at_key(&path, format!("node `{name}` must be a table"));
                self.push(d.help(format!("write it as [nodes.{name}] with kind = \"...\"")));
                continue;
            };
            let Some(kind_name) = self.string(table, &["nodes", name, "kind"], true) else {
                continue;
            };
            let Some(kind) = nodes::lookup(&kind_name) else {
                let d = self
                    .map
                    .at_value(
                        &["nodes", name, "kind"],
                        format!("unknown node kind `{kind_name}` for node `{name}`"),
                    )
                    .help(suggest(&kind_name, &kinds));
                self.push(d);
                continue;
            };
            let valid = valid_node_keys(kind);
            self.unknown_keys(
                table,
                &path,
                &valid,
                &format!("node `{name}` (kind {kind_name})"),
            );
            out.insert(
                name.clone(),
                RawNode {
                    kind,
                    table: table.clone(),
                },
            );
        }
        out
    }

    fn axes(&mut self, doc: &toml::Table, raw: &IndexMap<String, RawNode>) -> Vec<Axis> {
        let Some(t) = self.table(doc, &["sweep"]) else {
            return Vec::new();
        };
        sweep::parse_axes(self, t, raw)
    }

    fn report(&mut self, doc: &toml::Table, raw: &IndexMap<String, RawNode>) -> ReportSpec {
        let mut spec = ReportSpec::default();
        let Some(t) = self.table(doc, &["report"]) else {
            return spec;
        };
        self.unknown_keys(t, &["report"], REPORT_KEYS, "[report]");
        spec.eval = self.string_list(t, &["report", "eval"]).unwrap_or_default();
        spec.metrics = self
            .string_list(t, &["report", "metrics"])
            .unwrap_or_else(|| vec!["top1".into()]);
        spec.reference_label = self.string(t, &["report", "reference_label"], false);
        for e in &spec.eval {
            match raw.get(e) {
                None => {
                    let names: Vec<&str> = raw.keys().map(|s| s.as_str()).collect();
                    let d = self
                        .map
                        .at_value(
                            &["report", "eval"],
                            format!("[report] names node `{e}`, which does not exist"),
                        )
                        .help(suggest(e, &names));
                    self.push(d);
                }
                Some(n) if n.kind.output() != ArtifactType::Metrics => {
                    let d = self.map.at_value(
                        &["report", "eval"],
                        format!(
                            "[report] needs metrics, but node `{e}` (kind {}) produces {}",
                            n.kind.name(),
                            n.kind.output()
                        ),
                    );
                    self.push(d.help("name eval nodes here"));
                }
                _ => {}
            }
        }
        if let Some(r) = t.get("reference") {
            match r.as_table() {
                Some(rt) => {
                    for (k, v) in rt {
                        match v.as_float().or_else(|| v.as_integer().map(|i| i as f64)) {
                            Some(x) => {
                                spec.reference.insert(k.clone(), x);
                            }
                            None => {
                                let d = self.map.at_value(
                                    &["report", "reference", k],
                                    format!("reference value for `{k}` must be a number"),
                                );
                                self.push(d);
                            }
                        }
                    }
                }
                None => {
                    let d = self
                        .map
                        .at_value(
                            &["report", "reference"],
                            "`reference` must be a table of variant id = number",
                        )
                        .help("e.g. reference = { \"prompt=cip\" = 83.4 }");
                    self.push(d);
                }
            }
        }
        spec
    }

    /// Applies one variant's overrides and resolves every node.
    fn variant(
        &mut self,
        raw: &IndexMap<String, RawNode>,
        overrides: &[(String, String, toml::Value, Vec<String>)],
        datasets: &IndexMap<String, DatasetSpec>,
        models: &IndexMap<String, ModelSpec>,
    ) -> Option<Vec<NodeSpec>> {
        let mut specs: IndexMap<String, NodeSpec> = IndexMap::new();
        let node_names: Vec<&str> = raw.keys().map(|s| s.as_str()).collect();
        for (name, node) in raw {
            let errors_before = self.errors.len();
            let mut table = node.table.clone();
            // Where each key's value came from, for error locations: the node table or the sweep.
            let mut origin: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (n, param, value, at) in overrides {
                if n == name {
                    table.insert(param.clone(), value.clone());
                    origin.insert(param.clone(), at.clone());
                }
            }
            let loc = |key: &str| -> Vec<String> {
                origin
                    .get(key)
                    .cloned()
                    .unwrap_or_else(|| vec!["nodes".into(), name.clone(), key.into()])
            };
            let mut inputs = BTreeMap::new();
            for slot in node.kind.inputs() {
                let refs = match table.get(slot.name) {
                    None => {
                        if slot.required {
                            let d = self
                                .map
                                .at_key(
                                    &["nodes", name],
                                    format!("node `{name}` is missing its input `{}`", slot.name),
                                )
                                .help(format!(
                                    "add `{} = \"<node or dataset.split>\"` ({} expected)",
                                    slot.name,
                                    types_list(slot.accepts)
                                ));
                            self.push(d);
                        }
                        continue;
                    }
                    Some(v) => v.clone(),
                };
                let texts: Vec<String> = match &refs {
                    toml::Value::String(s) => vec![s.clone()],
                    toml::Value::Array(a) if slot.many => a
                        .iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect(),
                    _ => {
                        let l = loc(slot.name);
                        let p: Vec<&str> = l.iter().map(|s| s.as_str()).collect();
                        let d = self.map.at_value(
                            &p,
                            format!(
                                "input `{}` of node `{name}` must be {}",
                                slot.name,
                                if slot.many {
                                    "a reference or a list of references"
                                } else {
                                    "one reference string"
                                }
                            ),
                        );
                        self.push(d);
                        continue;
                    }
                };
                let mut resolved = Vec::new();
                for text in texts {
                    let l = loc(slot.name);
                    let p: Vec<&str> = l.iter().map(|s| s.as_str()).collect();
                    match resolve_ref(&text, raw, datasets) {
                        Ok(r) => {
                            let ty = match &r {
                                Ref::Node(n) => raw[n].kind.output(),
                                Ref::Split { .. } => ArtifactType::Images,
                            };
                            if !slot.accepts.contains(&ty) {
                                let d = self
                                    .map
                                    .at_value(
                                        &p,
                                        format!(
                                            "type mismatch: input `{}` of node `{name}` takes {}, but `{text}` produces {ty}",
                                            slot.name,
                                            types_list(slot.accepts)
                                        ),
                                    )
                                    .help(format!("feed `{}` from a node that produces {}", slot.name, types_list(slot.accepts)));
                                self.push(d);
                            }
                            resolved.push(r);
                        }
                        Err(why) => {
                            let mut d = self.map.at_value(
                                &p,
                                format!(
                                    "node `{name}`: input `{}` refers to `{text}`, {why}",
                                    slot.name
                                ),
                            );
                            let mut candidates: Vec<String> =
                                node_names.iter().map(|s| s.to_string()).collect();
                            for ds in datasets.values() {
                                for s in &ds.splits {
                                    candidates.push(format!("{}.{s}", ds.name));
                                }
                            }
                            let cands: Vec<&str> = candidates.iter().map(|s| s.as_str()).collect();
                            if let Some(c) = closest(&text, cands.iter().copied()) {
                                d = d.help(format!("did you mean `{c}`?"));
                            } else {
                                d = d.help(format!("known nodes and splits: {}", cands.join(", ")));
                            }
                            self.push(d);
                        }
                    }
                }
                inputs.insert(slot.name.to_string(), resolved);
            }
            let mut model_refs = BTreeMap::new();
            for slot in node.kind.models() {
                match table.get(slot.name).and_then(|v| v.as_str()) {
                    None => {
                        let d = self
                            .map
                            .at_key(
                                &["nodes", name],
                                format!("node `{name}` is missing its model `{}`", slot.name),
                            )
                            .help(format!(
                                "add `{} = \"<name of a [models.*] entry>\"`",
                                slot.name
                            ));
                        self.push(d);
                    }
                    Some(m) => match models.get(m) {
                        None => {
                            let l = loc(slot.name);
                            let p: Vec<&str> = l.iter().map(|s| s.as_str()).collect();
                            let names: Vec<&str> = models.keys().map(|s| s.as_str()).collect();
                            let d = self
                                .map
                                .at_value(&p, format!("node `{name}` refers to model `{m}`, which is not declared"))
                                .help(if names.is_empty() {
                                    format!("declare it: [models.{m}] path = \"...\" family = \"...\"")
                                } else {
                                    suggest(m, &names)
                                });
                            self.push(d);
                        }
                        Some(spec) if !slot.families.contains(&spec.family.as_str()) => {
                            let l = loc(slot.name);
                            let p: Vec<&str> = l.iter().map(|s| s.as_str()).collect();
                            let d = self.map.at_value(
                                &p,
                                format!(
                                    "type mismatch: node `{name}` needs a {} model, but `{m}` is {}",
                                    slot.families.join(" or "),
                                    spec.family
                                ),
                            );
                            self.push(d);
                        }
                        Some(_) => {
                            model_refs.insert(slot.name.to_string(), m.to_string());
                        }
                    },
                }
            }
            let mut params = toml::Table::new();
            for (k, v) in &table {
                let is_slot = k == "kind"
                    || node.kind.inputs().iter().any(|s| s.name == k)
                    || node.kind.models().iter().any(|s| s.name == k);
                if !is_slot {
                    params.insert(k.clone(), v.clone());
                }
            }
            let params = match node.kind.resolve_params(&params) {
                Ok(p) => p,
                Err(e) => {
                    let d = match &e.key {
                        Some(k) => {
                            let top = k.split('.').next().unwrap_or(k).to_string();
                            let l = loc(&top);
                            let p: Vec<&str> = l.iter().map(|s| s.as_str()).collect();
                            self.map.at_value(
                                &p,
                                format!(
                                    "node `{name}`: parameter `{k}`: {}",
                                    first_line(&e.message)
                                ),
                            )
                        }
                        None => {
                            let d = self.map.at_key(
                                &["nodes", name],
                                format!("node `{name}`: {}", first_line(&e.message)),
                            );
                            match e
                                .message
                                .strip_prefix("missing field `")
                                .and_then(|m| m.split('`').next())
                            {
                                Some(field) => {
                                    d.help(format!("add `{field} = ...` to [nodes.{name}]"))
                                }
                                None => d,
                            }
                        }
                    };
                    self.push(d);
                    serde_json::Value::Null
                }
            };
            if !params.is_null() && self.errors.len() == errors_before {
                let types: BTreeMap<String, Vec<ArtifactType>> = inputs
                    .iter()
                    .map(|(slot, refs): (&String, &Vec<Ref>)| {
                        let tys = refs
                            .iter()
                            .map(|r| match r {
                                Ref::Node(n) => raw[n].kind.output(),
                                Ref::Split { .. } => ArtifactType::Images,
                            })
                            .collect();
                        (slot.clone(), tys)
                    })
                    .collect();
                if let Err(e) = node.kind.validate(&params, &types) {
                    let d = match &e.key {
                        Some(k) => {
                            let l = loc(k);
                            let p: Vec<&str> = l.iter().map(|s| s.as_str()).collect();
                            self.map
                                .at_value(&p, format!("node `{name}`: `{k}`: {}", e.message))
                        }
                        None => self
                            .map
                            .at_key(&["nodes", name], format!("node `{name}`: {}", e.message)),
                    };
                    self.push(d);
                }
            }
            specs.insert(
                name.clone(),
                NodeSpec {
                    name: name.clone(),
                    kind: node.kind,
                    inputs,
                    models: model_refs,
                    params,
                },
            );
        }
        if !self.errors.is_empty() {
            return None;
        }
        self.topo_order(specs)
    }

    /// Cycles among the declared references, found before types are checked: a cycle is the
    /// structural problem to fix first.
    fn raw_cycles(&mut self, raw: &IndexMap<String, RawNode>) {
        let mut graph = DiGraph::<usize, ()>::new();
        let idx: Vec<_> = (0..raw.len()).map(|i| graph.add_node(i)).collect();
        for (i, node) in raw.values().enumerate() {
            for slot in node.kind.inputs() {
                let refs: Vec<&str> = match node.table.get(slot.name) {
                    Some(toml::Value::String(s)) => vec![s.as_str()],
                    Some(toml::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
                    _ => continue,
                };
                for r in refs {
                    if let Some(j) = raw.get_index_of(r) {
                        graph.add_edge(idx[j], idx[i], ());
                    }
                }
            }
        }
        self.report_cycles(&graph, |i| raw.get_index(i).unwrap().0.as_str());
    }

    fn report_cycles<'n>(&mut self, graph: &DiGraph<usize, ()>, name: impl Fn(usize) -> &'n str) {
        for scc in tarjan_scc(graph) {
            let is_cycle = scc.len() > 1 || graph.contains_edge(scc[0], scc[0]);
            if !is_cycle {
                continue;
            }
            let names: Vec<&str> = cycle_path(graph, &scc)
                .into_iter()
                .map(|n| name(graph[n]))
                .collect();
            let d = self
                .map
                .at_key(
                    &["nodes", names[0]],
                    format!("cycle in the node graph: {}", names.join(" -> ")),
                )
                .help("a node cannot depend on its own output; remove one of these references");
            self.push(d);
        }
    }

    /// Orders nodes so inputs come first; a cycle is an error naming every node on it.
    fn topo_order(&mut self, specs: IndexMap<String, NodeSpec>) -> Option<Vec<NodeSpec>> {
        let mut graph = DiGraph::<usize, ()>::new();
        let idx: Vec<_> = (0..specs.len()).map(|i| graph.add_node(i)).collect();
        for (i, spec) in specs.values().enumerate() {
            for refs in spec.inputs.values() {
                for r in refs {
                    if let Ref::Node(n) = r {
                        let j = specs.get_index_of(n).expect("references resolved");
                        graph.add_edge(idx[j], idx[i], ());
                    }
                }
            }
        }
        match petgraph::algo::toposort(&graph, None) {
            Ok(order) => {
                let mut specs: Vec<Option<NodeSpec>> = specs.into_values().map(Some).collect();
                Some(
                    order
                        .into_iter()
                        .map(|n| specs[graph[n]].take().unwrap())
                        .collect(),
                )
            }
            Err(_) => {
                let names: Vec<String> = specs.keys().cloned().collect();
                self.report_cycles(&graph, |i| names[i].as_str());
                None
            }
        }
    }
}

/// Walks one cycle inside a strongly connected component, in edge order, closing the loop.
fn cycle_path(
    graph: &DiGraph<usize, ()>,
    scc: &[petgraph::graph::NodeIndex],
) -> Vec<petgraph::graph::NodeIndex> {
    let start = *scc.iter().min_by_key(|n| graph[**n]).unwrap();
    let mut path = vec![start];
    let mut current = start;
    loop {
        let next = graph
            .neighbors(current)
            .filter(|n| scc.contains(n))
            .min_by_key(|n| graph[*n])
            .unwrap();
        if next == start || path.contains(&next) {
            path.push(next);
            return path;
        }
        path.push(next);
        current = next;
    }
}

pub(crate) struct RawNode {
    pub kind: &'static dyn NodeKind,
    pub table: toml::Table,
}

fn valid_node_keys(kind: &dyn NodeKind) -> Vec<&'static str> {
    let mut keys = vec!["kind"];
    keys.extend(kind.inputs().iter().map(|s| s.name));
    keys.extend(kind.models().iter().map(|s| s.name));
    keys.extend(kind.param_names().iter().copied());
    keys
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn types_list(types: &[ArtifactType]) -> String {
    types
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(" or ")
}

fn resolve_ref(
    text: &str,
    raw: &IndexMap<String, RawNode>,
    datasets: &IndexMap<String, DatasetSpec>,
) -> Result<Ref, String> {
    if raw.contains_key(text) {
        return Ok(Ref::Node(text.to_string()));
    }
    if let Some((ds, split)) = text.split_once('.') {
        if let Some(spec) = datasets.get(ds) {
            if spec.splits.iter().any(|s| s == split) {
                return Ok(Ref::Split {
                    dataset: ds.to_string(),
                    split: split.to_string(),
                });
            }
            return Err(format!(
                "but dataset `{ds}` has no split `{split}` (splits: {})",
                spec.splits.join(", ")
            ));
        }
        return Err(format!("but there is no dataset `{ds}`"));
    }
    Err("which is neither a node nor a dataset split".to_string())
}
