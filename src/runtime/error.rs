//! Errors of the runtime layer. Each message names the file, graph or setting at fault and says how
//! to fix it, because these errors reach the user verbatim (`cip models check`, `cip run`).

use std::path::PathBuf;

use super::model_dir::Family;
use super::provider::Provider;

/// Everything that can go wrong while finding ONNX Runtime, opening sessions or reading model
/// directories.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// `ORT_DYLIB_PATH` is set but names no file: an explicit setting must never be skipped silently.
    #[error(
        "ORT_DYLIB_PATH is set to {path}, but no such file exists; point it at the ONNX Runtime \
         library (e.g. .venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0) \
         or unset it to search .venv and the active Python"
    )]
    DylibPathMissing { path: PathBuf },

    /// No ONNX Runtime library anywhere in the search order; `tried` lists every place looked at.
    #[error("{}", library_not_found_message(.tried))]
    LibraryNotFound { tried: Vec<String> },

    /// The library was found but could not be loaded (wrong architecture, too old, not ONNX Runtime).
    #[error(
        "could not load the ONNX Runtime library {path}: {message}; cip needs onnxruntime 1.32 \
         (pip install onnxruntime==1.32.0, or set ORT_DYLIB_PATH to a compatible libonnxruntime.so)"
    )]
    LibraryLoad { path: PathBuf, message: String },

    /// The library loaded but the process-wide environment could not be created.
    #[error("could not create the ONNX Runtime environment from {library}: {message}")]
    Environment { library: PathBuf, message: String },

    /// A provider string (experiment file or CLI) that is not `cpu`, `cuda:N` or `tensorrt:N`.
    #[error(
        "invalid execution provider {input:?}: {reason}; valid forms are cpu, cuda:N and \
         tensorrt:N, where N is the GPU index (e.g. cuda:0)"
    )]
    InvalidProvider { input: String, reason: String },

    /// The loaded library was built without the requested provider (e.g. the CPU-only wheel).
    #[error(
        "execution provider {provider} is not available: the ONNX Runtime library {library} offers \
         only {}; install the GPU build into the venv (pip uninstall onnxruntime && pip install \
         onnxruntime-gpu==1.32.0) or set ORT_DYLIB_PATH to a CUDA-enabled libonnxruntime.so, or \
         run with provider cpu", .available.join(", ")
    )]
    ProviderUnavailable {
        provider: Provider,
        library: PathBuf,
        available: Vec<String>,
    },

    /// The provider is compiled in but refused to register (missing CUDA/cuDNN/TensorRT libraries,
    /// no such device). Never downgraded to a CPU run.
    #[error(
        "execution provider {provider} failed to register for {path}: {message}; check that the \
         GPU exists and that the CUDA/cuDNN (and TensorRT) libraries onnxruntime-gpu needs are on \
         the library path, or run with provider cpu"
    )]
    ProviderRegistration {
        provider: Provider,
        path: PathBuf,
        message: String,
    },

    /// An ONNX file to open does not exist.
    #[error("ONNX graph {path} does not exist")]
    GraphFileMissing { path: PathBuf },

    /// ONNX Runtime rejected the file or the session options (corrupt file, unsupported opset...).
    #[error("could not open ONNX graph {path} (provider {provider}): {message}")]
    SessionOpen {
        path: PathBuf,
        provider: Provider,
        message: String,
    },

    /// The directory has no `cip-model.toml`, so it was not made by the export tool.
    #[error(
        "{dir} is not a cip model directory: it has no cip-model.toml; export one with \
         `python models/export.py {family_hint} --out {dir}` (or `cip models check` a directory \
         that the export tool wrote)"
    )]
    ManifestMissing { dir: PathBuf, family_hint: String },

    /// The manifest exists but is not valid TOML or lacks a required field.
    #[error("{path} is not a valid cip model manifest: {message}")]
    ManifestParse { path: PathBuf, message: String },

    /// A manifest format this build does not understand (written by a newer export tool).
    #[error(
        "{path} has manifest format {found}, but this cip reads format {supported}; re-export the \
         directory with this checkout's models/export.py, or update cip"
    )]
    ManifestFormat {
        path: PathBuf,
        found: i64,
        supported: i64,
    },

    /// The manifest parses but contradicts itself (bad file paths, digest not matching its list).
    #[error("{path} is inconsistent: {problem}; re-export the model directory")]
    ManifestInvalid { path: PathBuf, problem: String },

    /// The directory holds another family than the caller needs.
    #[error("expected a {expected} model directory, found {found} in {dir}")]
    WrongFamily {
        dir: PathBuf,
        expected: Family,
        found: Family,
    },

    /// A file listed in the manifest (or a graph path) is absent.
    #[error(
        "model directory {dir} is missing {file} (listed in its cip-model.toml); the export is \
         incomplete or was copied partially: copy or re-export the whole directory"
    )]
    FileMissing { dir: PathBuf, file: String },

    /// A listed file has another size than recorded: truncated copy or a file changed after export.
    #[error(
        "model directory {dir}: {file} is {actual} bytes, but cip-model.toml records {expected}; \
         the file was truncated or replaced after export: copy or re-export the whole directory"
    )]
    FileSizeMismatch {
        dir: PathBuf,
        file: String,
        expected: u64,
        actual: u64,
    },

    /// A graph role the manifest does not declare.
    #[error(
        "model directory {dir} has no graph {role:?}; its cip-model.toml declares: {}",
        .available.join(", ")
    )]
    UnknownGraph {
        dir: PathBuf,
        role: String,
        available: Vec<String>,
    },

    /// The ONNX graph's inputs/outputs differ from what the manifest (the contract) declares.
    /// Boxed: it is by far the largest variant, and every `Result` pays for the largest.
    #[error("{0}")]
    GraphIoMismatch(Box<GraphIoMismatch>),

    /// `verify_deep` found content that differs from the recorded hashes.
    #[error(
        "model directory {dir} does not match the hashes in its cip-model.toml:\n{}\nthe files \
         changed after export: re-export the directory (or restore the original files)",
        bullet_list(.problems)
    )]
    ContentMismatch { dir: PathBuf, problems: Vec<String> },

    /// A family-specific `[config]` key that is missing or has the wrong type.
    #[error("{path}: [config] key {key:?} {problem}")]
    ConfigKey {
        path: PathBuf,
        key: String,
        problem: String,
    },

    /// An I/O error on a named file.
    #[error("could not read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Details of [`RuntimeError::GraphIoMismatch`].
#[derive(Debug)]
pub struct GraphIoMismatch {
    pub dir: PathBuf,
    pub role: String,
    /// The graph file, relative to `dir`.
    pub file: String,
    /// One line per missing, unexpected or mistyped tensor.
    pub problems: Vec<String>,
    /// The manifest's inputs and outputs, as `name: dtype [shape]`.
    pub expected_inputs: Vec<String>,
    pub expected_outputs: Vec<String>,
}

impl std::fmt::Display for GraphIoMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "graph {:?} ({}) in model directory {} does not match its cip-model.toml:\n{}\n\
             expected inputs: {}\nexpected outputs: {}\nre-export the directory so that the graph \
             and the manifest agree (models/README.md describes the contract)",
            self.role,
            self.file,
            self.dir.display(),
            bullet_list(&self.problems),
            self.expected_inputs.join(", "),
            self.expected_outputs.join(", ")
        )
    }
}

fn bullet_list(items: &[String]) -> String {
    items
        .iter()
        .map(|item| format!("  - {item}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn library_not_found_message(tried: &[String]) -> String {
    format!(
        "ONNX Runtime library (libonnxruntime.so) not found. Looked in:\n{}\nFix it in one of \
         these ways:\n  - run `make setup` (creates .venv with the pinned onnxruntime)\n  - pip \
         install onnxruntime==1.32.0 (CPU) or onnxruntime-gpu==1.32.0 (CUDA, TensorRT) into the \
         active Python\n  - set ORT_DYLIB_PATH to the library file, e.g. \
         <venv>/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0",
        bullet_list(tried)
    )
}
