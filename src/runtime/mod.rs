//! ONNX Runtime: library discovery, the process-wide environment, execution providers, sessions
//! and model directories.
//!
//! Every model in cip runs through ONNX Runtime, loaded at run time from a PyPI wheel (see
//! [`discover`]). The first call to [`runtime`] finds the library and builds the one environment
//! a process may have; [`open_session`] and [`ModelDir::session`] go through it, so no `ort` API is
//! ever touched before the library is loaded (ort would otherwise fall back to its own search and
//! panic when that fails).
//!
//! Model directories carry a `cip-model.toml` written by the export tool
//! (`models/cip_export/common.py`); [`ModelDir`] reads it, checks the files and checks each graph's
//! inputs and outputs against it, so that a broken export fails with a message naming the file or
//! tensor rather than deep inside a pipeline.

pub mod discover;
mod error;
mod model_dir;
mod provider;
mod report;
mod session;

use std::ffi::{c_char, c_int, CStr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

pub use discover::{find_library, LibrarySearch};
pub use error::{GraphIoMismatch, RuntimeError};
pub use model_dir::{
    DeepCheck, Digest, Dim, Family, FileEntry, GraphSpec, Manifest, ModelDir, TensorSpec,
    MANIFEST_FILE, MANIFEST_FORMAT,
};
pub use provider::{Provider, TensorRtOptions, CPU_PROVIDER};
pub use report::{check_model_dir, ModelReport};
pub use session::{open_session, OptimizationLevel, SessionConfig};

/// The loaded ONNX Runtime library and the process's environment.
#[derive(Debug)]
pub struct Runtime {
    library: PathBuf,
    environment: ort::environment::Environment,
}

impl Runtime {
    /// The library file that was loaded.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// The environment every session is created in.
    pub fn environment(&self) -> &ort::environment::Environment {
        &self.environment
    }

    /// ONNX Runtime's names of the execution providers the loaded library was built with (e.g.
    /// `CPUExecutionProvider`, `CUDAExecutionProvider`). Being listed does not guarantee that a
    /// provider registers: CUDA may still lack a device or its libraries.
    pub fn available_providers(&self) -> Result<Vec<String>, RuntimeError> {
        let api = ort::api();
        let mut names: *mut *mut c_char = std::ptr::null_mut();
        let mut count: c_int = 0;
        // SAFETY: the library is loaded (a `Runtime` exists); GetAvailableProviders fills an array
        // of `count` NUL-terminated strings that we release below.
        unsafe {
            ort::Error::result_from_status((api.GetAvailableProviders)(&mut names, &mut count))
        }
        .map_err(|e| RuntimeError::Environment {
            library: self.library.clone(),
            message: format!("could not list execution providers: {}", e.message()),
        })?;
        if names.is_null() {
            return Ok(Vec::new());
        }
        let providers = (0..count as usize)
            .map(|i| {
                // SAFETY: i < count, and every entry is a valid C string owned by the array.
                unsafe { CStr::from_ptr(*names.add(i)) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        // SAFETY: releases exactly the array returned above; its status carries no information.
        let _ = unsafe {
            ort::Error::result_from_status((api.ReleaseAvailableProviders)(names, count))
        };
        Ok(providers)
    }
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static RUNTIME_INIT: Mutex<()> = Mutex::new(());

/// The process's ONNX Runtime, loaded on first use from [`find_library`]'s result.
///
/// ONNX Runtime allows one environment per process, and `ort` loads one library per process, so
/// both live here for the life of the process. A failure is not cached: a caller may fix the
/// environment (e.g. set `ORT_DYLIB_PATH`) and try again.
pub fn runtime() -> Result<&'static Runtime, RuntimeError> {
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let _guard = RUNTIME_INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let library = find_library()?;
    // ort resolves a relative path against the executable's directory first; pin it here.
    let library = std::path::absolute(&library).unwrap_or(library);
    let builder = ort::init_from(&library).map_err(|e| RuntimeError::LibraryLoad {
        path: library.clone(),
        message: e.to_string(),
    })?;
    let environment = builder
        .with_name("cip")
        .with_telemetry(false)
        .build()
        .map_err(|e| RuntimeError::Environment {
            library: library.clone(),
            message: e.message().to_string(),
        })?;
    Ok(RUNTIME.get_or_init(|| Runtime {
        library,
        environment,
    }))
}
