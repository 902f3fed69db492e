//! Model directories: ONNX graphs plus the `cip-model.toml` manifest that the export tool writes
//! (`models/cip_export/common.py::write_manifest`; models/README.md is the contract).
//!
//! Opening a directory is cheap and strict: the manifest must parse, every listed file must exist
//! with its recorded size, and the recorded digest must match the recorded file list. Content
//! hashes are only recomputed on request ([`ModelDir::verify_deep`]), because rehashing gigabytes
//! of weights on every run is exactly what the recorded digest is there to avoid.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use ort::session::Session;
use ort::value::{TensorElementType, ValueType};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::{GraphIoMismatch, RuntimeError};
use super::session::{open_session, SessionConfig};

/// File name of the manifest in every model directory.
pub const MANIFEST_FILE: &str = "cip-model.toml";
/// The manifest format this build reads (common.py's `MANIFEST_FORMAT`).
pub const MANIFEST_FORMAT: i64 = 1;

/// Model families cip runs; each has its own directory layout and `[config]` keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    /// Stable Diffusion in optimum's ONNX layout.
    #[serde(rename = "sd")]
    Sd,
    /// BLIP-2 captioner.
    #[serde(rename = "blip2")]
    Blip2,
    /// ViT-GPT2 captioner.
    #[serde(rename = "vit-gpt2")]
    VitGpt2,
    /// Image classifier (ResNet) with its train-step graph.
    #[serde(rename = "classifier")]
    Classifier,
}

impl Family {
    /// The manifest's name of the family.
    pub fn as_str(&self) -> &'static str {
        match self {
            Family::Sd => "sd",
            Family::Blip2 => "blip2",
            Family::VitGpt2 => "vit-gpt2",
            Family::Classifier => "classifier",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `cip-model.toml`, field for field. Unknown keys are ignored so that an exporter may add
/// optional information without a format bump; incompatible changes bump `format`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version ([`MANIFEST_FORMAT`]).
    pub format: i64,
    pub family: Family,
    /// Weight dtype of the export (`float32`, `float16`).
    pub dtype: String,
    /// Where the weights came from (hub id, or a note for random-weight fixtures).
    pub source: String,
    /// Export tool version that wrote the directory.
    pub exporter: String,
    pub digest: Digest,
    /// Graphs by role (`unet`, `text_encoder`, `vision`, ...).
    #[serde(default)]
    pub graphs: BTreeMap<String, GraphSpec>,
    /// Family-specific settings (free-form; read with [`ModelDir::config_value`]).
    #[serde(default)]
    pub config: toml::Table,
    /// Every file of the directory except the manifest.
    #[serde(default)]
    pub files: Vec<FileEntry>,
}

/// The recorded directory digest: blake3 over sorted `"<path>\t<size>\t<blake3>\n"` lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub blake3: String,
    pub files: u64,
}

/// One ONNX graph and the tensors it must take and return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphSpec {
    /// Path relative to the directory, `/`-separated.
    pub path: String,
    #[serde(default)]
    pub inputs: Vec<TensorSpec>,
    #[serde(default)]
    pub outputs: Vec<TensorSpec>,
}

/// A graph input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    /// Element type as the manifest names it (`float32`, `int64`, ...).
    pub dtype: String,
    pub shape: Vec<Dim>,
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} {}",
            self.name,
            self.dtype,
            ShapeDisplay(&self.shape)
        )
    }
}

/// One dimension: fixed, or a symbolic name such as `batch`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Symbolic(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(name) => f.write_str(name),
        }
    }
}

struct ShapeDisplay<'a>(&'a [Dim]);

impl fmt::Display for ShapeDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, dim) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{dim}")?;
        }
        f.write_str("]")
    }
}

/// One file of the directory with its size and blake3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

/// What [`ModelDir::verify_deep`] rehashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeepCheck {
    pub files: usize,
    pub bytes: u64,
}

/// An opened, checked model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    manifest: Manifest,
}

impl ModelDir {
    /// Reads and checks `DIR/cip-model.toml`: format version, family (when `expected_family` is
    /// given), paths, file presence and sizes, and the recorded digest against the file list.
    pub fn open(dir: &Path, expected_family: Option<Family>) -> Result<ModelDir, RuntimeError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        if !manifest_path.is_file() {
            return Err(RuntimeError::ManifestMissing {
                dir: dir.to_path_buf(),
                family_hint: expected_family
                    .map_or("<family>", |f| f.as_str())
                    .to_string(),
            });
        }
        let text = std::fs::read_to_string(&manifest_path).map_err(|source| RuntimeError::Io {
            path: manifest_path.clone(),
            source,
        })?;
        let manifest = parse_manifest(&manifest_path, &text)?;

        if let Some(expected) = expected_family {
            if manifest.family != expected {
                return Err(RuntimeError::WrongFamily {
                    dir: dir.to_path_buf(),
                    expected,
                    found: manifest.family,
                });
            }
        }
        let model_dir = ModelDir {
            root: dir.to_path_buf(),
            manifest,
        };
        model_dir.check_consistency(&manifest_path)?;
        model_dir.check_files()?;
        Ok(model_dir)
    }

    /// The directory as given to [`ModelDir::open`].
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn family(&self) -> Family {
        self.manifest.family
    }

    /// The recorded directory digest (blake3 hex). Cache keys use it; it is not recomputed here
    /// (see [`ModelDir::verify_deep`]).
    pub fn digest(&self) -> &str {
        &self.manifest.digest.blake3
    }

    /// A file of the directory by its manifest path (e.g. `tokenizer/tokenizer.json`).
    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// The declaration of graph `role`.
    pub fn graph(&self, role: &str) -> Result<&GraphSpec, RuntimeError> {
        self.manifest
            .graphs
            .get(role)
            .ok_or_else(|| RuntimeError::UnknownGraph {
                dir: self.root.clone(),
                role: role.to_string(),
                available: self.manifest.graphs.keys().cloned().collect(),
            })
    }

    /// Opens graph `role` and checks that its input and output names and element types are
    /// exactly the manifest's, so that model code can feed and read tensors by those names.
    pub fn session(&self, role: &str, config: &SessionConfig) -> Result<Session, RuntimeError> {
        let spec = self.graph(role)?;
        let session = open_session(&self.path(&spec.path), config)?;
        let mut problems = io_problems("input", &spec.inputs, session.inputs());
        problems.extend(io_problems("output", &spec.outputs, session.outputs()));
        if !problems.is_empty() {
            return Err(RuntimeError::GraphIoMismatch(Box::new(GraphIoMismatch {
                dir: self.root.clone(),
                role: role.to_string(),
                file: spec.path.clone(),
                problems,
                expected_inputs: spec.inputs.iter().map(ToString::to_string).collect(),
                expected_outputs: spec.outputs.iter().map(ToString::to_string).collect(),
            })));
        }
        Ok(session)
    }

    /// The free-form `[config]` table.
    pub fn config(&self) -> &toml::Table {
        &self.manifest.config
    }

    /// A `[config]` value by key; dots reach into sub-tables (`scheduler.beta_start`).
    pub fn config_value<T: DeserializeOwned>(&self, key: &str) -> Result<T, RuntimeError> {
        let key_error = |problem: String| RuntimeError::ConfigKey {
            path: self.root.join(MANIFEST_FILE),
            key: key.to_string(),
            problem,
        };
        let mut parts = key.split('.');
        let first = parts.next().unwrap_or(key);
        let mut value = self
            .manifest
            .config
            .get(first)
            .ok_or_else(|| key_error("is missing".to_string()))?;
        for part in parts {
            value = value
                .get(part)
                .ok_or_else(|| key_error("is missing".to_string()))?;
        }
        value
            .clone()
            .try_into()
            .map_err(|e| key_error(format!("has the wrong type: {}", e.message())))
    }

    /// The whole `[config]` table as a family's typed struct.
    pub fn config_as<T: DeserializeOwned>(&self) -> Result<T, RuntimeError> {
        self.manifest
            .config
            .clone()
            .try_into()
            .map_err(|e| RuntimeError::ManifestParse {
                path: self.root.join(MANIFEST_FILE),
                message: format!("[config]: {}", e.message()),
            })
    }

    /// Rehashes every file and recomputes the directory digest exactly as common.py does (over the
    /// files actually present), reporting every difference from the manifest.
    pub fn verify_deep(&self) -> Result<DeepCheck, RuntimeError> {
        let actual = list_files(&self.root)?;
        let mut problems = Vec::new();
        let mut actual_entries = Vec::new();
        let mut bytes = 0;
        let recorded: BTreeMap<&str, &FileEntry> = self
            .manifest
            .files
            .iter()
            .map(|f| (f.path.as_str(), f))
            .collect();
        for relative in &actual {
            let path = self.root.join(relative);
            let (size, hash) = hash_file(&path)?;
            bytes += size;
            match recorded.get(relative.as_str()) {
                None => problems.push(format!("{relative} is not listed in the manifest")),
                Some(entry) if entry.size != size => {
                    problems.push(format!("{relative}: size {size}, recorded {}", entry.size))
                }
                Some(entry) if entry.blake3 != hash => problems.push(format!(
                    "{relative}: blake3 {hash}, recorded {}",
                    entry.blake3
                )),
                Some(_) => {}
            }
            actual_entries.push(FileEntry {
                path: relative.clone(),
                size,
                blake3: hash,
            });
        }
        let present: BTreeSet<&str> = actual.iter().map(String::as_str).collect();
        for entry in &self.manifest.files {
            if !present.contains(entry.path.as_str()) {
                problems.push(format!("{} is missing", entry.path));
            }
        }
        let digest = directory_digest(&actual_entries);
        if digest != self.manifest.digest.blake3 {
            problems.push(format!(
                "directory digest {digest}, recorded {}",
                self.manifest.digest.blake3
            ));
        }
        if problems.is_empty() {
            Ok(DeepCheck {
                files: actual.len(),
                bytes,
            })
        } else {
            Err(RuntimeError::ContentMismatch {
                dir: self.root.clone(),
                problems,
            })
        }
    }

    /// Paths stay inside the directory, and the recorded digest is the digest of the recorded
    /// list (a hand-edited list would otherwise leave cache keys unchanged).
    fn check_consistency(&self, manifest_path: &Path) -> Result<(), RuntimeError> {
        let invalid = |problem: String| RuntimeError::ManifestInvalid {
            path: manifest_path.to_path_buf(),
            problem,
        };
        let files = &self.manifest.files;
        let graph_paths = self.manifest.graphs.values().map(|g| &g.path);
        for path in files.iter().map(|f| &f.path).chain(graph_paths) {
            if !is_plain_relative(path) {
                return Err(invalid(format!(
                    "file path {path:?} is not a relative path inside the directory"
                )));
            }
        }
        if self.manifest.digest.files != files.len() as u64 {
            return Err(invalid(format!(
                "[digest] counts {} files, but [[files]] lists {}",
                self.manifest.digest.files,
                files.len()
            )));
        }
        let digest = directory_digest(files);
        if digest != self.manifest.digest.blake3 {
            return Err(invalid(format!(
                "[digest] blake3 is {}, but the [[files]] list hashes to {digest}",
                self.manifest.digest.blake3
            )));
        }
        Ok(())
    }

    /// Every listed file and every graph exists, with the recorded size.
    fn check_files(&self) -> Result<(), RuntimeError> {
        let missing = |file: &str| RuntimeError::FileMissing {
            dir: self.root.clone(),
            file: file.to_string(),
        };
        for entry in &self.manifest.files {
            let metadata = std::fs::metadata(self.path(&entry.path))
                .ok()
                .filter(|m| m.is_file())
                .ok_or_else(|| missing(&entry.path))?;
            if metadata.len() != entry.size {
                return Err(RuntimeError::FileSizeMismatch {
                    dir: self.root.clone(),
                    file: entry.path.clone(),
                    expected: entry.size,
                    actual: metadata.len(),
                });
            }
        }
        for graph in self.manifest.graphs.values() {
            if !self.path(&graph.path).is_file() {
                return Err(missing(&graph.path));
            }
        }
        Ok(())
    }
}

/// Checks `format` before the rest, so that a future format gets a version error rather than a
/// confusing "missing field" one.
fn parse_manifest(path: &Path, text: &str) -> Result<Manifest, RuntimeError> {
    let parse_error = |message: String| RuntimeError::ManifestParse {
        path: path.to_path_buf(),
        message,
    };
    let table: toml::Table = toml::from_str(text).map_err(|e| parse_error(e.to_string()))?;
    match table.get("format") {
        None => return Err(parse_error("missing field `format`".to_string())),
        Some(toml::Value::Integer(found)) if *found != MANIFEST_FORMAT => {
            return Err(RuntimeError::ManifestFormat {
                path: path.to_path_buf(),
                found: *found,
                supported: MANIFEST_FORMAT,
            })
        }
        Some(toml::Value::Integer(_)) => {}
        Some(other) => {
            return Err(parse_error(format!(
                "`format` must be an integer, found {other}"
            )))
        }
    }
    toml::from_str(text).map_err(|e| parse_error(e.to_string().trim_end().to_string()))
}

/// A `/`-separated path with only normal components (no `..`, no root).
fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// common.py's `directory_digest`: blake3 over "<path>\t<size>\t<blake3>\n" sorted by path.
/// Rust's byte order on UTF-8 strings equals Python's code-point order.
fn directory_digest(files: &[FileEntry]) -> String {
    let mut sorted: Vec<&FileEntry> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut hasher = blake3::Hasher::new();
    for f in sorted {
        hasher.update(format!("{}\t{}\t{}\n", f.path, f.size, f.blake3).as_bytes());
    }
    hasher.finalize().to_hex().to_string()
}

/// All files under `root` as `/`-separated relative paths, except any `cip-model.toml`, like
/// common.py's `rglob("*")` (which does not descend into symlinked directories).
fn list_files(root: &Path) -> Result<Vec<String>, RuntimeError> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), RuntimeError> {
        let io_error = |source| RuntimeError::Io {
            path: dir.to_path_buf(),
            source,
        };
        for entry in std::fs::read_dir(dir).map_err(io_error)? {
            let entry = entry.map_err(io_error)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let relative = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            let file_type = entry.file_type().map_err(io_error)?;
            if file_type.is_dir() {
                walk(&entry.path(), &relative, out)?;
            } else if entry.path().is_file() && name != MANIFEST_FILE {
                out.push(relative);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(root, "", &mut files)?;
    files.sort();
    Ok(files)
}

/// Size and blake3 hex of a file, streamed so that multi-gigabyte weights need no memory.
fn hash_file(path: &Path) -> Result<(u64, String), RuntimeError> {
    let io_error = |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_error)?;
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer).map_err(io_error)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buffer[..n]);
    }
    Ok((size, hasher.finalize().to_hex().to_string()))
}

/// Differences between declared and actual inputs (or outputs): missing, unexpected, wrong type.
fn io_problems(kind: &str, declared: &[TensorSpec], actual: &[ort::value::Outlet]) -> Vec<String> {
    let actual_types: BTreeMap<&str, String> = actual
        .iter()
        .map(|outlet| (outlet.name(), manifest_dtype(outlet.dtype())))
        .collect();
    let declared_names: BTreeSet<&str> = declared.iter().map(|t| t.name.as_str()).collect();
    let mut problems = Vec::new();
    for spec in declared {
        match actual_types.get(spec.name.as_str()) {
            None => problems.push(format!(
                "{kind} {:?} is declared in the manifest but missing from the graph",
                spec.name
            )),
            Some(dtype) if *dtype != spec.dtype => problems.push(format!(
                "{kind} {:?} is {dtype} in the graph, but the manifest declares {}",
                spec.name, spec.dtype
            )),
            Some(_) => {}
        }
    }
    for outlet in actual {
        if !declared_names.contains(outlet.name()) {
            problems.push(format!(
                "{kind} {:?} ({}) is in the graph but not declared in the manifest",
                outlet.name(),
                manifest_dtype(outlet.dtype())
            ));
        }
    }
    problems
}

/// The manifest's name of an element type: common.py's table, else the ONNX type number (which
/// is what common.py writes for types outside its table).
fn manifest_dtype(value_type: &ValueType) -> String {
    let ValueType::Tensor { ty, .. } = value_type else {
        return value_type.to_string();
    };
    let name = match ty {
        TensorElementType::Float32 => "float32",
        TensorElementType::Uint8 => "uint8",
        TensorElementType::Int8 => "int8",
        TensorElementType::Int16 => "int16",
        TensorElementType::Int32 => "int32",
        TensorElementType::Int64 => "int64",
        TensorElementType::Bool => "bool",
        TensorElementType::Float16 => "float16",
        TensorElementType::Float64 => "float64",
        TensorElementType::Bfloat16 => "bfloat16",
        other => return (ort::sys::ONNXTensorElementDataType::from(*other) as i32).to_string(),
    };
    name.to_string()
}
