//! Finding `libonnxruntime.so`: cip links ONNX Runtime dynamically and takes the library from a
//! PyPI wheel (`onnxruntime` or `onnxruntime-gpu`), so nothing downloads at build time and the
//! Rust side runs exactly the runtime the Python reference side uses.
//!
//! Search order: `ORT_DYLIB_PATH`, then a project `.venv` (walking up from the current directory,
//! then from the executable's directory), then the active Python (`$VIRTUAL_ENV`, then `python3`).
//! The search is a pure function of [`LibrarySearch`], so tests need not touch the process
//! environment.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::error::RuntimeError;

/// Asks Python where the `onnxruntime` package lives without importing it: importing loads numpy
/// and the runtime itself, which is slow and can fail for reasons unrelated to the library file.
const PYTHON_FIND_PACKAGE: &str = "import importlib.util as u\n\
s = u.find_spec('onnxruntime')\n\
print(list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else '')";

/// The inputs of the library search. [`LibrarySearch::from_process`] fills them from the process;
/// tests build them by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibrarySearch {
    /// Value of `ORT_DYLIB_PATH`; `None` or empty means unset.
    pub ort_dylib_path: Option<OsString>,
    /// Directories to walk up from, looking for `.venv` (the current dir, the executable's dir).
    pub venv_search_starts: Vec<PathBuf>,
    /// Value of `VIRTUAL_ENV` (an activated venv).
    pub virtual_env: Option<PathBuf>,
    /// The Python interpreter to ask last (`python3`).
    pub python: OsString,
}

impl LibrarySearch {
    /// The search as the running process sees it.
    pub fn from_process() -> Self {
        let mut starts = Vec::new();
        if let Ok(cwd) = std::env::current_dir() {
            starts.push(cwd);
        }
        if let Some(exe_dir) = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
        {
            if !starts.contains(&exe_dir) {
                starts.push(exe_dir);
            }
        }
        LibrarySearch {
            ort_dylib_path: std::env::var_os("ORT_DYLIB_PATH"),
            venv_search_starts: starts,
            virtual_env: std::env::var_os("VIRTUAL_ENV")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            python: OsString::from("python3"),
        }
    }

    /// Runs the search; the error lists every place looked at and how to fix it.
    pub fn find(&self) -> Result<PathBuf, RuntimeError> {
        let mut tried = Vec::new();

        match self.ort_dylib_path.as_ref().filter(|v| !v.is_empty()) {
            Some(value) => {
                let path = PathBuf::from(value);
                // An explicit setting that is wrong is an error, not a reason to look elsewhere.
                return if path.is_file() {
                    Ok(path)
                } else {
                    Err(RuntimeError::DylibPathMissing { path })
                };
            }
            None => tried.push("ORT_DYLIB_PATH: not set".to_string()),
        }

        for start in &self.venv_search_starts {
            let mut venvs_without_runtime = Vec::new();
            for dir in start.ancestors() {
                let venv = dir.join(".venv");
                if !venv.is_dir() {
                    continue;
                }
                if let Some(lib) = library_in_venv(&venv) {
                    return Ok(lib);
                }
                venvs_without_runtime.push(venv);
            }
            if venvs_without_runtime.is_empty() {
                tried.push(format!(
                    "a .venv in {} or its parent directories: none found",
                    start.display()
                ));
            } else {
                for venv in venvs_without_runtime {
                    tried.push(format!(
                        "{}: no onnxruntime/capi/libonnxruntime.so* under lib/python3*/site-packages",
                        venv.display()
                    ));
                }
            }
        }

        let mut pythons = Vec::new();
        match &self.virtual_env {
            Some(venv) => {
                if let Some(lib) = library_in_venv(venv) {
                    return Ok(lib);
                }
                tried.push(format!(
                    "VIRTUAL_ENV={}: no onnxruntime/capi/libonnxruntime.so* under lib/python3*/site-packages",
                    venv.display()
                ));
                let python = venv.join("bin").join("python");
                if python.is_file() {
                    pythons.push(python.into_os_string());
                }
            }
            None => tried.push("VIRTUAL_ENV: not set".to_string()),
        }
        pythons.push(self.python.clone());

        for python in &pythons {
            match ask_python(python) {
                Ok(lib) => return Ok(lib),
                Err(why) => tried.push(format!("{}: {why}", Path::new(python).display())),
            }
        }

        Err(RuntimeError::LibraryNotFound { tried })
    }
}

/// Finds the ONNX Runtime library the way a cip run does (see the module docs).
pub fn find_library() -> Result<PathBuf, RuntimeError> {
    LibrarySearch::from_process().find()
}

/// `<venv>/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*`, if present.
fn library_in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python3"))
        .map(|entry| entry.path())
        .collect();
    // Deterministic choice when a venv was upgraded in place and holds two Python versions.
    pythons.sort();
    pythons.iter().rev().find_map(|python| {
        library_in_capi(
            &python
                .join("site-packages")
                .join("onnxruntime")
                .join("capi"),
        )
    })
}

/// The runtime library in a wheel's `capi/` directory. Provider libraries
/// (`libonnxruntime_providers_*.so`) sit beside it and must not match.
fn library_in_capi(capi: &Path) -> Option<PathBuf> {
    let stem = format!("{}onnxruntime.", std::env::consts::DLL_PREFIX);
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(capi)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with(&stem) && name.contains(std::env::consts::DLL_SUFFIX)
        })
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .collect();
    candidates.sort();
    candidates.pop()
}

/// Asks one interpreter for its `onnxruntime` package directory; `Err` says why it gave none.
fn ask_python(python: &OsString) -> Result<PathBuf, String> {
    let output = Command::new(python)
        .args(["-c", PYTHON_FIND_PACKAGE])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run it ({e})"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last_line = stderr.lines().last().unwrap_or("").trim();
        return Err(format!("failed ({}: {last_line})", output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let package = stdout.trim();
    if package.is_empty() {
        return Err("onnxruntime is not installed".to_string());
    }
    let capi = Path::new(package).join("capi");
    library_in_capi(&capi).ok_or_else(|| {
        format!(
            "onnxruntime is installed at {package}, but {} holds no libonnxruntime.so*",
            capi.display()
        )
    })
}
