//! `cip models check DIR [--deep]`: open a model directory the way a run would, open every graph
//! on the CPU, and print what the directory holds.

use std::fmt;
use std::path::{Path, PathBuf};

use super::error::RuntimeError;
use super::model_dir::{DeepCheck, Manifest, ModelDir};
use super::session::SessionConfig;

/// What `cip models check` found; `Display` is the command's output.
#[derive(Debug, Clone)]
pub struct ModelReport {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The rehash summary when `--deep` was given.
    pub deep: Option<DeepCheck>,
}

/// Opens `dir` (any family), opens each graph on the CPU and checks its inputs and outputs
/// against the manifest; with `deep`, also rehashes every file. The first problem is the error.
pub fn check_model_dir(dir: &Path, deep: bool) -> Result<ModelReport, RuntimeError> {
    let model_dir = ModelDir::open(dir, None)?;
    // Rehash first: a corrupt file is better reported as a hash mismatch than as a parse error.
    let deep = if deep {
        Some(model_dir.verify_deep()?)
    } else {
        None
    };
    // Threads stay modest: this only proves that each graph loads.
    let config = SessionConfig {
        intra_threads: Some(1),
        ..SessionConfig::default()
    };
    for role in model_dir.manifest().graphs.keys() {
        model_dir.session(role, &config)?;
    }
    Ok(ModelReport {
        dir: dir.to_path_buf(),
        manifest: model_dir.manifest().clone(),
        deep,
    })
}

impl fmt::Display for ModelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.manifest;
        let total: u64 = m.files.iter().map(|file| file.size).sum();
        writeln!(f, "model directory {}", self.dir.display())?;
        writeln!(f, "  family    {}", m.family)?;
        writeln!(f, "  dtype     {}", m.dtype)?;
        writeln!(f, "  source    {}", m.source)?;
        writeln!(f, "  exporter  {}", m.exporter)?;
        writeln!(
            f,
            "  digest    {} ({} files, {})",
            m.digest.blake3,
            m.digest.files,
            human_bytes(total)
        )?;
        match &self.deep {
            Some(deep) => writeln!(
                f,
                "  content   verified: {} files rehashed ({}), digest matches",
                deep.files,
                human_bytes(deep.bytes)
            )?,
            None => writeln!(f, "  content   sizes checked (--deep rehashes every file)")?,
        }
        writeln!(
            f,
            "  graphs (opened on the CPU, inputs and outputs match the manifest)"
        )?;
        for (role, graph) in &m.graphs {
            writeln!(f, "    {role}  {}", graph.path)?;
            let name_width = graph
                .inputs
                .iter()
                .chain(&graph.outputs)
                .map(|t| t.name.len())
                .max()
                .unwrap_or(0);
            for (direction, tensors) in [("in ", &graph.inputs), ("out", &graph.outputs)] {
                for tensor in tensors {
                    let shape: Vec<String> = tensor.shape.iter().map(ToString::to_string).collect();
                    writeln!(
                        f,
                        "      {direction} {:name_width$}  {:8} [{}]",
                        tensor.name,
                        tensor.dtype,
                        shape.join(", ")
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = "B";
    for next in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}
