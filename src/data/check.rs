//! `cip data check`: is an ImageFolder dataset whole? Per split and class, image counts; every image
//! decoded (corrupt, truncated or unreadable files and broken links are reported by path); the
//! range of image sizes; classes missing from a split or from the class file.
//!
//! DIR is either a dataset root (`DIR/<split>/<class>/<image>`) or one split
//! (`DIR/<class>/<image>`): a root is a folder whose subfolders have subfolders.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::imagefolder::IMAGE_EXTENSIONS;
use super::{io_err, ClassNames, DataError};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitReport {
    /// The split's folder name; empty when DIR itself is the split.
    pub name: String,
    /// Class folder -> images in it (readable or not).
    pub classes: BTreeMap<String, usize>,
    pub images: usize,
    /// Smallest and largest width and height among the readable images.
    pub width: Option<(u32, u32)>,
    pub height: Option<(u32, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub dir: PathBuf,
    pub splits: Vec<SplitReport>,
    pub problems: Vec<Problem>,
}

/// Checks `dir`; `classes` (a class file) adds the check that each split has exactly its classes.
pub fn check(dir: &Path, classes: Option<&ClassNames>) -> Result<CheckReport, DataError> {
    if !dir.is_dir() {
        return Err(DataError::Invalid {
            path: dir.to_path_buf(),
            message: "not a folder: expected a dataset root (<split>/<class>/<image>) or a split (<class>/<image>)".into(),
        });
    }
    let subdirs = subfolders(dir)?;
    let is_root = subdirs
        .iter()
        .any(|d| subfolders(d).map(|s| !s.is_empty()).unwrap_or(false));
    let splits: Vec<(String, PathBuf)> = if is_root {
        subdirs
            .iter()
            .map(|d| {
                (
                    d.file_name().unwrap().to_string_lossy().into_owned(),
                    d.clone(),
                )
            })
            .collect()
    } else {
        vec![(String::new(), dir.to_path_buf())]
    };
    let mut report = CheckReport {
        dir: dir.to_path_buf(),
        ..CheckReport::default()
    };
    for (name, path) in splits {
        let (split, problems) = check_split(&name, &path)?;
        report.problems.extend(problems);
        report.splits.push(split);
    }
    if report.splits.iter().all(|s| s.images == 0) {
        report.problems.push(Problem {
            path: dir.to_path_buf(),
            message: "no images found".into(),
        });
    }
    // Splits of one dataset share their classes: a class missing from one split is a problem.
    if report.splits.len() > 1 {
        let all: std::collections::BTreeSet<&String> = report
            .splits
            .iter()
            .flat_map(|s| s.classes.keys())
            .collect();
        for s in &report.splits {
            let missing: Vec<&str> = all
                .iter()
                .filter(|c| !s.classes.contains_key(**c))
                .map(|c| c.as_str())
                .collect();
            if !missing.is_empty() {
                report.problems.push(Problem {
                    path: dir.join(&s.name),
                    message: format!(
                        "no folder for class(es) other splits have: {}",
                        missing.join(", ")
                    ),
                });
            }
        }
    }
    if let Some(names) = classes {
        for s in &report.splits {
            let absent: Vec<&str> = names
                .ids
                .iter()
                .filter(|c| !s.classes.contains_key(*c))
                .map(String::as_str)
                .collect();
            let extra: Vec<&str> = s
                .classes
                .keys()
                .filter(|c| !names.names.contains_key(*c))
                .map(String::as_str)
                .collect();
            if !absent.is_empty() {
                report.problems.push(Problem {
                    path: dir.join(&s.name),
                    message: format!(
                        "no folder for class(es) of the class file: {}",
                        absent.join(", ")
                    ),
                });
            }
            if !extra.is_empty() {
                report.problems.push(Problem {
                    path: dir.join(&s.name),
                    message: format!(
                        "class folder(s) not in the class file: {}",
                        extra.join(", ")
                    ),
                });
            }
        }
    }
    Ok(report)
}

fn subfolders(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_dir() && !path.file_name().unwrap().to_string_lossy().starts_with('.') {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_string_lossy().as_ref()))
        .unwrap_or(false)
}

fn check_split(name: &str, dir: &Path) -> Result<(SplitReport, Vec<Problem>), DataError> {
    let mut split = SplitReport {
        name: name.to_string(),
        ..SplitReport::default()
    };
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for class_dir in subfolders(dir)? {
        let class = class_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut count = 0;
        for entry in std::fs::read_dir(&class_dir).map_err(io_err(&class_dir))? {
            let path = entry.map_err(io_err(&class_dir))?.path();
            // By name, not by `is_file`: a broken link must be reported, not skipped.
            if has_image_extension(&path) && !path.is_dir() {
                files.push(path);
                count += 1;
            }
        }
        if count == 0 {
            problems.push(Problem {
                path: class_dir.clone(),
                message: "empty class folder".into(),
            });
        }
        split.classes.insert(class, count);
    }
    split.images = files.len();
    // Decoding dominates, on all cores.
    type Decoded = (PathBuf, Result<(u32, u32), String>);
    let results: Vec<Decoded> = files
        .into_par_iter()
        .map(|path| {
            let decoded = decode_size(&path);
            (path, decoded)
        })
        .collect();
    for (path, result) in results {
        match result {
            Ok((w, h)) => {
                split.width = Some(widen(split.width, w));
                split.height = Some(widen(split.height, h));
            }
            Err(message) => problems.push(Problem { path, message }),
        }
    }
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((split, problems))
}

fn widen(range: Option<(u32, u32)>, v: u32) -> (u32, u32) {
    range.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v)))
}

/// Decodes the whole image (a valid header over truncated data must fail too). The format comes
/// from the bytes, not the extension: ImageNet has PNG and CMYK files named `.JPEG`.
fn decode_size(path: &Path) -> Result<(u32, u32), String> {
    if let (Ok(target), false) = (std::fs::read_link(path), path.exists()) {
        return Err(format!("broken link to {}", target.display()));
    }
    let reader = image::ImageReader::open(path)
        .map_err(|e| format!("cannot open: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?;
    let img = reader.decode().map_err(|e| format!("cannot decode: {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err("empty image".into());
    }
    Ok((img.width(), img.height()))
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.dir.display())?;
        for s in &self.splits {
            let label = if s.name.is_empty() {
                "(split)"
            } else {
                &s.name
            };
            let (lo, hi) = (
                s.classes.values().min().copied().unwrap_or(0),
                s.classes.values().max().copied().unwrap_or(0),
            );
            let sizes = match (s.width, s.height) {
                (Some((w0, w1)), Some((h0, h1))) => {
                    format!("widths {w0}..{w1}, heights {h0}..{h1}")
                }
                _ => "no readable image".into(),
            };
            writeln!(
                f,
                "  {label}: {} classes, {} images ({lo}..{hi} per class), {sizes}",
                s.classes.len(),
                s.images
            )?;
            for (class, n) in &s.classes {
                writeln!(f, "    {class:<12} {n}")?;
            }
        }
        if self.problems.is_empty() {
            writeln!(f, "ok: no problems")?;
        } else {
            writeln!(f, "{} problem(s):", self.problems.len())?;
            for p in &self.problems {
                let shown = p.path.strip_prefix(&self.dir).unwrap_or(&p.path);
                let shown = if shown.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    shown
                };
                writeln!(f, "  {}: {}", shown.display(), p.message)?;
            }
        }
        Ok(())
    }
}
