//! Opening ONNX Runtime sessions with a chosen provider and thread settings.

use std::path::Path;

use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

use super::error::RuntimeError;
use super::provider::{execution_providers, Provider, TensorRtOptions};
use super::runtime;

/// ONNX Runtime's graph optimisation levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OptimizationLevel {
    /// No graph rewrites; for debugging a suspected optimiser bug.
    Disable,
    /// Constant folding and redundant-node removal.
    Basic,
    /// Basic plus operator fusions (attention, GELU, layer norm).
    Extended,
    /// Everything, including layout changes; ONNX Runtime's own default.
    #[default]
    All,
}

impl From<OptimizationLevel> for GraphOptimizationLevel {
    fn from(level: OptimizationLevel) -> Self {
        match level {
            OptimizationLevel::Disable => GraphOptimizationLevel::Disable,
            OptimizationLevel::Basic => GraphOptimizationLevel::Level1,
            OptimizationLevel::Extended => GraphOptimizationLevel::Level2,
            OptimizationLevel::All => GraphOptimizationLevel::All,
        }
    }
}

/// How to open a session. None of these settings changes results beyond floating-point noise, so
/// none of them belongs in a cache key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionConfig {
    /// Where the graph runs.
    pub provider: Provider,
    /// Threads inside one operator; `None` lets ONNX Runtime use one per physical core.
    pub intra_threads: Option<usize>,
    /// Threads running independent branches of the graph at once; `Some(n)` with n > 1 turns on
    /// parallel execution, which only pays off for graphs with wide branches.
    pub inter_threads: Option<usize>,
    /// Graph optimisation level.
    pub optimization: OptimizationLevel,
    /// TensorRT settings, used when `provider` is TensorRT.
    pub tensorrt: TensorRtOptions,
    /// Write ONNX Runtime's per-operator profile (JSON, chrome://tracing format) to files whose
    /// names start with this prefix; for `cip bench`, never for normal runs (it slows them).
    pub profile: Option<std::path::PathBuf>,
    /// Symbolic dimensions fixed to a size (e.g. `batch` = 32): ONNX Runtime then plans memory and
    /// picks kernels for static shapes, which made the classifier's train step about 1.5x faster
    /// on the CPU. A session so fixed accepts only that size.
    pub fixed_dims: Vec<(String, i64)>,
}

impl SessionConfig {
    /// The default configuration on another provider.
    pub fn with_provider(provider: Provider) -> Self {
        SessionConfig {
            provider,
            ..SessionConfig::default()
        }
    }
}

/// Opens `path` as an ONNX Runtime session. Errors name the file; a GPU provider that cannot be
/// registered is an error (see [`super::provider`]).
pub fn open_session(path: &Path, config: &SessionConfig) -> Result<Session, RuntimeError> {
    if !path.is_file() {
        return Err(RuntimeError::GraphFileMissing {
            path: path.to_path_buf(),
        });
    }
    let runtime = runtime()?;
    let provider = config.provider;
    let session_error = |message: String| RuntimeError::SessionOpen {
        path: path.to_path_buf(),
        provider,
        message,
    };

    if provider != Provider::Cpu {
        let available = runtime.available_providers()?;
        if !provider
            .ort_names()
            .iter()
            .all(|name| available.iter().any(|a| a == name))
        {
            return Err(RuntimeError::ProviderUnavailable {
                provider,
                library: runtime.library().to_path_buf(),
                available,
            });
        }
        if let Some(cache) = &config.tensorrt.engine_cache {
            if matches!(provider, Provider::TensorRt(_)) {
                std::fs::create_dir_all(cache).map_err(|source| RuntimeError::Io {
                    path: cache.clone(),
                    source,
                })?;
            }
        }
    }

    let builder =
        configure(Session::builder(runtime.environment()), config).map_err(session_error)?;
    let mut builder = builder
        .with_execution_providers(execution_providers(provider, &config.tensorrt))
        .map_err(|e| RuntimeError::ProviderRegistration {
            provider,
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
    builder
        .commit_from_file(path)
        .map_err(|e| session_error(e.message().to_string()))
}

/// Applies threads and optimisation level; `Err` carries ONNX Runtime's message.
fn configure(
    builder: ort::Result<SessionBuilder>,
    config: &SessionConfig,
) -> Result<SessionBuilder, String> {
    let mut builder = builder
        .map_err(|e| e.message().to_string())?
        .with_optimization_level(config.optimization.into())
        .map_err(|e| e.message().to_string())?;
    if let Some(threads) = config.intra_threads {
        builder = builder
            .with_intra_threads(threads)
            .map_err(|e| e.message().to_string())?;
    }
    for (name, size) in &config.fixed_dims {
        builder = builder
            .with_dimension_override(name, *size)
            .map_err(|e| e.message().to_string())?;
    }
    if let Some(prefix) = &config.profile {
        builder = builder
            .with_profiling(prefix)
            .map_err(|e| e.message().to_string())?;
    }
    if let Some(threads) = config.inter_threads {
        builder = builder
            .with_parallel_execution(threads > 1)
            .map_err(|e| e.message().to_string())?
            .with_inter_threads(threads)
            .map_err(|e| e.message().to_string())?;
    }
    Ok(builder)
}
