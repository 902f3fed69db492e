//! `cip data subset`: ImageNette / ImageNet-100 (or any class list) from a local ImageNet-1K tree,
//! by links, never copies.
//!
//! Input: `ROOT/<split>/<wnid>/*.JPEG`. The val split must be in class folders too; the flat
//! 50,000-file ILSVRC2012 val folder is detected and either sorted on the fly from Kaggle's
//! `LOC_val_solution.csv` (`--val-labels`) or refused with the two ways to sort it.
//! Output: `OUT/<split>/<wnid>/<file>` links, `OUT/<split>/manifest.csv` (id, path, class) and
//! `OUT/classes.csv` (a copy of the class file). Reruns relink nothing that is already right and
//! rewrite no manifest that is unchanged, so the dataset fingerprint stays valid.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::imagefolder::IMAGE_EXTENSIONS;
use super::{csv_bytes, io_err, write_if_changed, ClassNames, CsvTable, DataError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LinkKind {
    /// Absolute symbolic links: work across filesystems.
    Symlink,
    /// Hard links: survive moving ROOT, need OUT on ROOT's filesystem.
    Hardlink,
}

#[derive(Debug, Clone)]
pub struct SubsetOptions {
    pub imagenet: PathBuf,
    pub classes: PathBuf,
    pub out: PathBuf,
    pub link: LinkKind,
    pub splits: Vec<String>,
    /// Labels for a flat val folder: Kaggle's LOC_val_solution.csv.
    pub val_labels: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitSummary {
    pub split: String,
    pub classes: usize,
    pub images: usize,
    /// Links made (missing or pointing elsewhere before).
    pub linked: usize,
    pub unchanged: usize,
    /// Links in the output's class folders that the class file no longer asks for.
    pub removed: usize,
    pub min_per_class: usize,
    pub max_per_class: usize,
    /// Class folders in the output that are not in the class file (left alone).
    pub foreign: Vec<String>,
}

/// One image to link: its source file and its place in the output.
struct Item {
    source: PathBuf,
    class: String,
    file_name: String,
}

pub fn subset(opts: &SubsetOptions) -> Result<Vec<SplitSummary>, DataError> {
    if !opts.imagenet.is_dir() {
        return Err(DataError::MissingRoot {
            path: opts.imagenet.clone(),
        });
    }
    // Absolute link targets: a relative one would break when OUT is read from elsewhere.
    let root = opts
        .imagenet
        .canonicalize()
        .map_err(io_err(&opts.imagenet))?;
    let classes = ClassNames::read(&opts.classes)?;
    if classes.ids.is_empty() {
        return Err(DataError::Invalid {
            path: opts.classes.clone(),
            message: "the class file lists no classes".into(),
        });
    }
    // Check every split before linking anything: a wrong ROOT fails fast and leaves OUT untouched.
    let mut plans = Vec::new();
    for split in &opts.splits {
        plans.push((split.clone(), list_split(&root, opts, split, &classes)?));
    }
    let mut summaries = Vec::new();
    for (split, items) in plans {
        summaries.push(link_split(opts, &split, &classes, items)?);
    }
    let class_file = std::fs::read(&opts.classes).map_err(io_err(&opts.classes))?;
    write_if_changed(&opts.out.join("classes.csv"), &class_file)?;
    Ok(summaries)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_string_lossy().as_ref()))
        .unwrap_or(false)
}

/// Sorted image file names directly in `dir`.
fn images_in(dir: &Path) -> Result<Vec<String>, DataError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if is_image(&path) && path.is_file() {
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn list_split(
    root: &Path,
    opts: &SubsetOptions,
    split: &str,
    classes: &ClassNames,
) -> Result<Vec<Item>, DataError> {
    let dir = root.join(split);
    if !dir.is_dir() {
        return Err(DataError::MissingSplit {
            root: opts.imagenet.clone(),
            split: split.to_string(),
        });
    }
    let flat = images_in(&dir)?;
    if !flat.is_empty() {
        return match (&opts.val_labels, split) {
            (Some(labels), "val") => sort_flat(&dir, &flat, labels, classes),
            _ => Err(DataError::FlatSplit {
                dir: opts.imagenet.join(split),
                images: flat.len(),
            }),
        };
    }
    let missing: Vec<String> = classes
        .ids
        .iter()
        .filter(|id| !dir.join(id).is_dir())
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(DataError::MissingClasses {
            dir: opts.imagenet.join(split),
            split: split.to_string(),
            classes: opts.classes.clone(),
            total: classes.ids.len(),
            missing,
        });
    }
    let per_class: Vec<Result<Vec<Item>, DataError>> = classes
        .ids
        .par_iter()
        .map(|class| {
            let class_dir = dir.join(class);
            Ok(images_in(&class_dir)?
                .into_iter()
                .map(|file_name| Item {
                    source: class_dir.join(&file_name),
                    class: class.clone(),
                    file_name,
                })
                .collect())
        })
        .collect();
    let mut items = Vec::new();
    for list in per_class {
        items.extend(list?);
    }
    Ok(items)
}

/// The images of a flat val folder that belong to the class file's classes, by Kaggle's
/// LOC_val_solution.csv (`ImageId,PredictionString`; the first word of PredictionString is the
/// image's WordNet id).
fn sort_flat(
    dir: &Path,
    files: &[String],
    labels: &Path,
    classes: &ClassNames,
) -> Result<Vec<Item>, DataError> {
    let table = CsvTable::read(labels)?;
    let (image_col, pred_col) = (
        table.require("ImageId")?,
        table.require("PredictionString")?,
    );
    let by_stem: BTreeMap<&str, &String> = files
        .iter()
        .map(|f| (f.rsplit_once('.').map_or(f.as_str(), |(stem, _)| stem), f))
        .collect();
    let wanted: BTreeSet<&str> = classes.ids.iter().map(String::as_str).collect();
    let mut items = Vec::new();
    let mut found = BTreeSet::new();
    for row in &table.rows {
        let image = row.get(image_col).unwrap_or("");
        let wnid = row
            .get(pred_col)
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("");
        if !wanted.contains(wnid) {
            continue;
        }
        let Some(file_name) = by_stem.get(image) else {
            return Err(DataError::Invalid {
                path: labels.to_path_buf(),
                message: format!(
                    "image `{image}` ({wnid}) is not in {}: do the labels belong to this val folder?",
                    dir.display()
                ),
            });
        };
        found.insert(wnid.to_string());
        items.push(Item {
            source: dir.join(file_name),
            class: wnid.to_string(),
            file_name: (*file_name).clone(),
        });
    }
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|w| !found.contains(*w))
        .collect();
    if !missing.is_empty() {
        return Err(DataError::Invalid {
            path: labels.to_path_buf(),
            message: format!(
                "no image labelled {} (classes from the class file)",
                missing.join(", ")
            ),
        });
    }
    Ok(items)
}

fn link_split(
    opts: &SubsetOptions,
    split: &str,
    classes: &ClassNames,
    items: Vec<Item>,
) -> Result<SplitSummary, DataError> {
    let out = opts.out.join(split);
    let mut summary = SplitSummary {
        split: split.to_string(),
        classes: classes.ids.len(),
        images: items.len(),
        ..SplitSummary::default()
    };
    for class in &classes.ids {
        std::fs::create_dir_all(out.join(class)).map_err(io_err(&out.join(class)))?;
    }
    let made: Vec<Result<bool, DataError>> = items
        .par_iter()
        .map(|item| {
            let dest = out.join(&item.class).join(&item.file_name);
            place_link(&item.source, &dest, opts.link)
        })
        .collect();
    for m in made {
        if m? {
            summary.linked += 1;
        } else {
            summary.unchanged += 1;
        }
    }

    // Links of an earlier run with another class file or fewer images go; anything that is not a
    // link we could have made (a file with a single link) stays.
    let expected: BTreeSet<(String, String)> = items
        .iter()
        .map(|i| (i.class.clone(), i.file_name.clone()))
        .collect();
    for class in &classes.ids {
        let dir = out.join(class);
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = entry.map_err(io_err(&dir))?.path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if expected.contains(&(class.clone(), name)) || !is_image(&path) {
                continue;
            }
            if was_linked(&path) {
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                summary.removed += 1;
            }
        }
    }
    let known: BTreeSet<&str> = classes.ids.iter().map(String::as_str).collect();
    for entry in std::fs::read_dir(&out).map_err(io_err(&out))? {
        let path = entry.map_err(io_err(&out))?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() && !known.contains(name.as_str()) {
            summary.foreign.push(name);
        }
    }
    summary.foreign.sort();

    let mut per_class: BTreeMap<&str, usize> =
        classes.ids.iter().map(|c| (c.as_str(), 0)).collect();
    let mut rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            *per_class.get_mut(i.class.as_str()).unwrap() += 1;
            let stem = i
                .file_name
                .rsplit_once('.')
                .map_or(i.file_name.as_str(), |(s, _)| s);
            vec![
                format!("{}/{stem}", i.class),
                format!("{}/{}", i.class, i.file_name),
                i.class.clone(),
            ]
        })
        .collect();
    rows.sort();
    summary.min_per_class = per_class.values().copied().min().unwrap_or(0);
    summary.max_per_class = per_class.values().copied().max().unwrap_or(0);
    write_if_changed(
        &out.join("manifest.csv"),
        &csv_bytes(&["id", "path", "class"], &rows),
    )?;
    Ok(summary)
}

/// A symlink, or a file that has another hard link: what a previous subset run leaves.
fn was_linked(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => true,
        Ok(m) => m.is_file() && m.nlink() > 1,
        Err(_) => false,
    }
}

/// Makes `dest` a link to `source`; returns false when it already was one.
fn place_link(source: &Path, dest: &Path, kind: LinkKind) -> Result<bool, DataError> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = std::fs::symlink_metadata(dest) {
        let same = match kind {
            LinkKind::Symlink => {
                meta.file_type().is_symlink()
                    && std::fs::read_link(dest).ok().as_deref() == Some(source)
            }
            LinkKind::Hardlink => std::fs::metadata(source)
                .map(|s| meta.is_file() && s.dev() == meta.dev() && s.ino() == meta.ino())
                .unwrap_or(false),
        };
        if same {
            return Ok(false);
        }
        std::fs::remove_file(dest).map_err(io_err(dest))?;
    }
    let made = match kind {
        LinkKind::Symlink => std::os::unix::fs::symlink(source, dest),
        LinkKind::Hardlink => std::fs::hard_link(source, dest),
    };
    made.map_err(|source_err| {
        if kind == LinkKind::Hardlink && source_err.raw_os_error() == Some(libc::EXDEV) {
            DataError::Invalid {
                path: dest.to_path_buf(),
                message: format!(
                    "cannot hard-link across filesystems (from {}): put --out on ImageNet's filesystem or use --link symlink",
                    source.display()
                ),
            }
        } else {
            DataError::Io {
                path: dest.to_path_buf(),
                source: source_err,
            }
        }
    })?;
    Ok(true)
}
