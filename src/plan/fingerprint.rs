//! Fingerprints of what a key depends on outside the cache: dataset splits, model directories and
//! files named by parameters.
//!
//! Datasets are fingerprinted by their (relative path, size, mtime) listing by default: hashing
//! terabytes on every run is the top complaint about DVC. `fingerprint = "content"` opts in to a
//! full content hash. Models use the digest the export tool recorded in `cip-model.toml`, checked
//! against the recorded file sizes. A split that carries a `manifest.csv` (id, path, class) is
//! fingerprinted by that file alone; image files it lists are then trusted not to change in place.

use std::path::Path;
use std::time::UNIX_EPOCH;

use rayon::prelude::*;

/// Why a fingerprint could not be taken; the message is shown after the item's name.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FingerprintError(pub String);

fn walk(
    dir: &Path,
    rel: &str,
    out: &mut Vec<(String, std::fs::Metadata, std::path::PathBuf)>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let meta = std::fs::metadata(&path)?; // follows symlinks: `cip data subset` links files
        let r = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        if meta.is_dir() {
            walk(&path, &r, out)?;
        } else {
            out.push((r, meta, path));
        }
    }
    Ok(())
}

pub fn dataset_split(
    dir: &Path,
    classes: Option<&Path>,
    deep: bool,
) -> Result<String, FingerprintError> {
    if !dir.is_dir() {
        return Err(FingerprintError(format!(
            "directory {} not found",
            dir.display()
        )));
    }
    // Class folders are walked in parallel: a 1.28 M-image split is mostly stat calls.
    let mut tops: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| FingerprintError(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    tops.sort();
    let lists: Vec<Result<Vec<String>, FingerprintError>> = tops
        .par_iter()
        .map(|(name, path)| {
            let mut files = Vec::new();
            let meta = std::fs::metadata(path)
                .map_err(|e| FingerprintError(format!("{}: {e}", path.display())))?;
            if meta.is_dir() {
                walk(path, name, &mut files)
                    .map_err(|e| FingerprintError(format!("{}: {e}", path.display())))?;
            } else {
                files.push((name.clone(), meta, path.clone()));
            }
            let mut lines = Vec::with_capacity(files.len());
            for (rel, meta, full) in files {
                let tail = if deep {
                    file_digest(&full)?
                } else {
                    let mtime = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_nanos())
                        .unwrap_or(0);
                    mtime.to_string()
                };
                lines.push(format!("{rel}\t{}\t{tail}\n", meta.len()));
            }
            lines.sort();
            Ok(lines)
        })
        .collect();
    let mut hasher = blake3::Hasher::new();
    hasher.update(if deep { b"content\n" } else { b"stat\n" });
    let mut count = 0usize;
    for list in lists {
        for line in list? {
            hasher.update(line.as_bytes());
            count += 1;
        }
    }
    if count == 0 {
        return Err(FingerprintError(format!(
            "directory {} holds no files",
            dir.display()
        )));
    }
    if let Some(c) = classes {
        hasher.update(b"classes\t");
        hasher.update(file_digest(c)?.as_bytes());
    }
    Ok(hasher.finalize().to_hex().to_string())
}

pub fn file_digest(path: &Path) -> Result<String, FingerprintError> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap_rayon(path)
        .map_err(|e| FingerprintError(format!("cannot read {}: {e}", path.display())))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// The directory digest recorded by the export tool, after checking every listed file's size.
pub fn model_digest(dir: &Path) -> Result<String, FingerprintError> {
    let manifest = dir.join("cip-model.toml");
    let text = std::fs::read_to_string(&manifest).map_err(|_| {
        if dir.is_dir() {
            FingerprintError(format!(
                "{} not found: not an exported cip model directory",
                manifest.display()
            ))
        } else {
            FingerprintError(format!("directory {} not found", dir.display()))
        }
    })?;
    let doc: toml::Table = toml::from_str(&text)
        .map_err(|e| FingerprintError(format!("{}: {}", manifest.display(), e.message())))?;
    let digest = doc
        .get("digest")
        .and_then(|d| d.get("blake3"))
        .and_then(|d| d.as_str())
        .ok_or_else(|| FingerprintError(format!("{}: no [digest] blake3", manifest.display())))?;
    if let Some(files) = doc.get("files").and_then(|f| f.as_array()) {
        for f in files {
            let (Some(rel), Some(size)) = (
                f.get("path").and_then(|p| p.as_str()),
                f.get("size").and_then(|s| s.as_integer()),
            ) else {
                continue;
            };
            match std::fs::metadata(dir.join(rel)) {
                Err(_) => return Err(FingerprintError(format!("{}: listed file {rel} is missing", dir.display()))),
                Ok(m) if m.len() != size as u64 => {
                    return Err(FingerprintError(format!(
                        "{}: {rel} changed since export ({} bytes, manifest says {size}); re-export the model",
                        dir.display(),
                        m.len()
                    )))
                }
                Ok(_) => {}
            }
        }
    }
    Ok(digest.to_string())
}
