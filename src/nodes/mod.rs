//! One module per node kind. A kind describes its typed input slots, its model slots and its
//! parameters (so the experiment file can be validated before anything runs), and knows how to run.
//!
//! Parameters split in two: those that change the result go into the node key; those that only
//! change speed (batch size, threads) are listed in `speed_only` and are kept out of the key, so
//! retuning throughput never invalidates a cached stage.

pub mod caption;
pub mod compose;
pub mod eval;
pub mod generate;
#[cfg(any(test, feature = "test-kinds"))]
pub mod testkinds;
pub mod train;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cache::Builder;

/// What flows along an edge of the DAG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactType {
    /// An image set: ImageFolder layout with `manifest.csv` (id, path, class, provenance...).
    Images,
    /// `captions.csv`: id, class, caption (+ token count).
    Captions,
    /// `prompts.csv`: id, class, prompt, negative_prompt, source_id.
    Prompts,
    /// ONNX classifier with weights, classes and training log.
    Classifier,
    /// `metrics.json` / CSV.
    Metrics,
}

impl ArtifactType {
    /// The file every artifact of this type holds at its root.
    pub fn main_file(self) -> &'static str {
        match self {
            ArtifactType::Images => "manifest.csv",
            ArtifactType::Captions => "captions.csv",
            ArtifactType::Prompts => "prompts.csv",
            ArtifactType::Classifier => "cip-model.toml",
            ArtifactType::Metrics => "metrics.json",
        }
    }
}

impl fmt::Display for ArtifactType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ArtifactType::Images => "images",
            ArtifactType::Captions => "captions",
            ArtifactType::Prompts => "prompts",
            ArtifactType::Classifier => "classifier",
            ArtifactType::Metrics => "metrics",
        })
    }
}

/// A named input of a node kind, e.g. compose's `captions`.
#[derive(Debug, Clone, Copy)]
pub struct InputSlot {
    pub name: &'static str,
    pub accepts: &'static [ArtifactType],
    /// Takes a list of references rather than one.
    pub many: bool,
    pub required: bool,
}

/// A model a node kind needs, e.g. generate's `model` of family `sd`.
#[derive(Debug, Clone, Copy)]
pub struct ModelSlot {
    pub name: &'static str,
    pub families: &'static [&'static str],
}

/// An input artifact as a running node sees it.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub ty: ArtifactType,
    pub dir: PathBuf,
    /// Where it came from, for messages: `node captions` or `dataset demo.train`.
    pub origin: String,
    /// For dataset splits: the class file that maps folder ids to prompt names, if declared.
    pub classes: Option<PathBuf>,
}

/// A model directory as a running node sees it.
#[derive(Debug, Clone)]
pub struct ModelInput {
    pub name: String,
    pub dir: PathBuf,
    pub family: String,
}

/// Run-time settings that never enter a key.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub provider: String,
    pub threads: usize,
    pub devices: Vec<String>,
    pub show_progress: bool,
    /// Root of TensorRT's engine caches (`<cache root>/.tensorrt`, which cache gc leaves alone);
    /// building a UNet engine takes minutes, so every run after the first reuses it.
    pub engine_cache: Option<PathBuf>,
}

/// Everything a node needs to run. `out` is the entry's partial directory: write outputs there.
pub struct RunContext<'a> {
    pub node: &'a str,
    pub params: &'a serde_json::Value,
    pub inputs: BTreeMap<String, Vec<Artifact>>,
    pub models: BTreeMap<String, ModelInput>,
    pub out: &'a Path,
    pub builder: &'a Builder,
    pub seed: u64,
    pub settings: &'a RunSettings,
    /// Relative paths in parameters resolve against the experiment file's directory.
    pub experiment_dir: &'a Path,
    /// Set when this run is one worker on shards of the node (`cip shard`, several devices):
    /// a journaled kind then processes only the items of the shards it pulls from the queue,
    /// journals each into its shard journal, and writes no final output (the finaliser, an
    /// ordinary run of the node, does that from the union of all journals).
    pub shards: Option<&'a crate::exec::ShardQueue>,
}

impl<'a> RunContext<'a> {
    pub fn input(&self, slot: &str) -> Result<&Artifact, NodeError> {
        self.inputs
            .get(slot)
            .and_then(|v| v.first())
            .ok_or_else(|| NodeError::MissingInput(slot.to_string()))
    }

    pub fn resolve_file(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.experiment_dir.join(p)
        }
    }

    /// Whether this run is a shard worker (see `shards`): it must not write final outputs.
    pub fn is_shard_worker(&self) -> bool {
        self.shards.is_some()
    }

    /// The node's progress display: shared by all shard workers of a queue.
    pub fn progress(&self, total: u64, already: u64) -> crate::exec::NodeProgress<'a> {
        match self.shards {
            Some(queue) => {
                crate::exec::NodeProgress::Shared(queue.progress(self.node, total, already))
            }
            None => crate::exec::NodeProgress::Own(crate::exec::Progress::new(
                self.node,
                total,
                already,
                self.settings.show_progress,
            )),
        }
    }

    /// The parts of a journaled node's work: `work(journal name, owns)` is called once for an
    /// ordinary run (journal `base`, every item), or once per shard pulled from the queue
    /// (journal `<base>.shard-<i>-of-<n>`, only the items of that shard).
    pub fn for_each_part(
        &self,
        base: &str,
        mut work: impl FnMut(&str, &dyn Fn(&str) -> bool) -> Result<(), NodeError>,
    ) -> Result<(), NodeError> {
        match self.shards {
            None => work(base, &|_| true),
            Some(queue) => {
                while let Some(spec) = queue.next() {
                    work(&spec.journal_name(base), &|item| spec.owns(item))?;
                }
                Ok(())
            }
        }
    }

    /// [`Self::for_each_part`] with the items each part still has to do: `work(journal, todo)`
    /// runs once per part with unfinished items (never for a finaliser whose shards did them all),
    /// so the model behind `work` can open lazily.
    pub fn for_each_todo<'i, T>(
        &self,
        base: &str,
        items: &'i [T],
        id: impl Fn(&T) -> &str,
        done: &std::collections::HashSet<String>,
        mut work: impl FnMut(&mut crate::cache::Journal, Vec<&'i T>) -> Result<(), NodeError>,
    ) -> Result<(), NodeError> {
        self.for_each_part(base, |journal_name, owns| {
            let todo: Vec<&T> = items
                .iter()
                .filter(|i| owns(id(i)) && !done.contains(id(i)))
                .collect();
            if todo.is_empty() {
                return Ok(());
            }
            let mut journal = self.builder.journal(journal_name)?;
            work(&mut journal, todo)
        })
    }

    pub fn params<P: DeserializeOwned>(&self) -> Result<P, NodeError> {
        serde_json::from_value(self.params.clone()).map_err(|e| NodeError::Params(e.to_string()))
    }
}

/// What a finished node reports; `counts` goes into the entry's metadata.
#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    pub counts: BTreeMap<String, u64>,
    pub extra: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("input slot `{0}` is empty")]
    MissingInput(String),
    #[error("invalid parameters: {0}")]
    Params(String),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl NodeError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> NodeError {
        let path = path.into();
        move |source| NodeError::Io { path, source }
    }
}

/// Why a parameter table is invalid: `key` is the offending parameter, when known.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamError {
    pub key: Option<String>,
    pub message: String,
}

/// A node kind: static description plus behaviour.
pub trait NodeKind: Send + Sync {
    fn name(&self) -> &'static str;
    /// Bumped when the implementation changes its results; part of every key of this kind.
    fn version(&self) -> u32;
    fn inputs(&self) -> &'static [InputSlot];
    fn models(&self) -> &'static [ModelSlot] {
        &[]
    }
    fn output(&self) -> ArtifactType;
    /// Every parameter name the kind accepts (for unknown-key errors and sweep checks).
    fn param_names(&self) -> &'static [&'static str];
    /// Parameters that only change speed; they are dropped from the key.
    fn speed_only(&self) -> &'static [&'static str] {
        &[]
    }
    /// Parameters naming files whose CONTENT changes the result (class lists...): the planner puts
    /// their blake3 in the key, so editing the file reruns the node.
    fn file_params(&self) -> &'static [&'static str] {
        &[]
    }
    /// Whether the experiment seed changes this kind's results (it then enters the key).
    fn seeded(&self) -> bool {
        false
    }
    /// Type-checks the parameter table and returns it with every default filled in.
    fn resolve_params(&self, table: &toml::Table) -> Result<serde_json::Value, ParamError>;
    /// Checks that need the input types too (e.g. template placeholders against known columns).
    fn validate(
        &self,
        _params: &serde_json::Value,
        _inputs: &BTreeMap<String, Vec<ArtifactType>>,
    ) -> Result<(), ParamError> {
        Ok(())
    }
    /// Item-parallel kinds journal per item and can be sharded. Such a kind must honour
    /// [`RunContext::for_each_part`] (only its shards' items, one journal per shard), take its
    /// done set from all journals ([`Builder::journal_done`]) and, as a shard worker, write no
    /// final output.
    fn journaled(&self) -> bool {
        false
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<RunSummary, NodeError>;
}

/// Deserialises a parameter table into the kind's typed struct and back to canonical JSON.
/// The round trip fills defaults and normalises numbers (e.g. `7` and `7.0` for a float field).
pub fn resolve_typed<P: DeserializeOwned + Serialize>(
    table: &toml::Table,
) -> Result<serde_json::Value, ParamError> {
    let value = toml::Value::Table(table.clone());
    let parsed: P = serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        ParamError {
            key: (key != "." && !key.is_empty()).then_some(key),
            message: e.into_inner().to_string(),
        }
    })?;
    serde_json::to_value(&parsed).map_err(|e| ParamError {
        key: None,
        message: e.to_string(),
    })
}

/// Every node kind compiled into this binary.
pub fn registry() -> Vec<&'static dyn NodeKind> {
    #[allow(unused_mut)]
    let mut kinds: Vec<&'static dyn NodeKind> = vec![
        &caption::Caption,
        &compose::Compose,
        &generate::Generate,
        &train::Train,
        &eval::Eval,
    ];
    #[cfg(any(test, feature = "test-kinds"))]
    kinds.extend(testkinds::kinds());
    kinds
}

pub fn lookup(name: &str) -> Option<&'static dyn NodeKind> {
    registry().into_iter().find(|k| k.name() == name)
}
