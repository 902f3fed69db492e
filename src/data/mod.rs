//! Datasets (ImageFolder), class lists, CSV manifests, and the `cip data` commands that provide
//! them: a drawn demo set (`demo`), ImageNet subsets by links (`subset`), fast.ai's ImageNette
//! archives (`fetch`) and an integrity check (`check`).
//!
//! CSV is the manifest format between nodes: it opens in anything, and every artifact's rows carry
//! a stable `id` so that outputs can be sorted, merged and resumed independently of order.

pub mod augment;
pub mod check;
pub mod classes;
pub mod cli;
pub mod demo;
pub mod fetch;
pub mod imagefolder;
pub mod subset;
pub mod table;

pub use classes::ClassNames;
pub use table::CsvTable;

use std::path::{Path, PathBuf};

/// The ten ImageNette classes in ImageNet index order: WordNet id and CLIP-style prompt name, as in
/// `experiments/classes/imagenette.csv` (a test keeps the two equal). `demo` and `fetch` write them
/// as the `classes.csv` of the sets they make.
pub const IMAGENETTE_CLASSES: [(&str, &str); 10] = [
    ("n01440764", "tench"),
    ("n02102040", "English Springer Spaniel"),
    ("n02979186", "cassette player"),
    ("n03000684", "chainsaw"),
    ("n03028079", "church"),
    ("n03394916", "French horn"),
    ("n03417042", "garbage truck"),
    ("n03425413", "gas pump"),
    ("n03445777", "golf ball"),
    ("n03888257", "parachute"),
];

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Csv {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    /// A command-line value out of range; `arg` is the flag as the user typed it.
    #[error("{arg}: {message}")]
    Argument { arg: String, message: String },
    #[error("ImageNet root {path} not found: pass --imagenet the folder that holds train/ and val/ (ROOT/train/<wnid>/*.JPEG)")]
    MissingRoot { path: PathBuf },
    #[error("{root} has no `{split}` folder: expected {root}/{split}/<wnid>/*.JPEG (or leave `{split}` out of --splits)")]
    MissingSplit { root: PathBuf, split: String },
    #[error("{dir}: no folder for {} of the {total} classes in {classes}: {}; is {} the full ImageNet-1K {split} tree?", .missing.len(), list_some(.missing, 5), .dir.parent().unwrap_or(.dir).display())]
    MissingClasses {
        /// `ROOT/<split>`.
        dir: PathBuf,
        split: String,
        classes: PathBuf,
        total: usize,
        missing: Vec<String>,
    },
    #[error("{dir} holds {images} images directly, not in class folders (the flat ILSVRC2012 val layout). Either pass --val-labels LOC_val_solution.csv (Kaggle's ImageNet Object Localization Challenge file: ImageId, PredictionString whose first word is the wnid) and cip links each image into its class, or sort the folder once in place with valprep.sh (from the PyTorch ImageNet example: `cd {} && bash valprep.sh`)", .dir.display())]
    FlatSplit { dir: PathBuf, images: usize },
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{path}: SHA-256 is {actual}, expected {expected}; the file was removed and nothing was unpacked. {help}")]
    Checksum {
        path: PathBuf,
        actual: String,
        expected: String,
        help: String,
    },
    #[error("{path}: {message}")]
    Archive { path: PathBuf, message: String },
    #[error("{dir}: {problems} problem(s) found, listed above")]
    CheckFailed { dir: PathBuf, problems: usize },
}

/// `a, b, c (+N more)`: long lists in error messages stay one line.
fn list_some(items: &[String], shown: usize) -> String {
    let mut s = items
        .iter()
        .take(shown)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > shown {
        s.push_str(&format!(" (+{} more)", items.len() - shown));
    }
    s
}

/// An `Io` error for `path`, for `map_err`.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` unless the file already holds exactly them, through a temp file and a
/// rename. Unchanged files keep their mtime, so dataset fingerprints and the cache stay valid.
/// Returns whether it wrote.
pub(crate) fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<bool, DataError> {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.is_file() && meta.len() == bytes.len() as u64 {
            let current = std::fs::read(path).map_err(io_err(path))?;
            if current == bytes {
                return Ok(false);
            }
        }
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(true)
}

/// CSV text of a header and rows, as `write_csv` would write it (for compare-before-write).
pub(crate) fn csv_bytes<R: AsRef<[u8]>>(headers: &[&str], rows: &[Vec<R>]) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(headers).expect("in-memory CSV");
    for row in rows {
        w.write_record(row).expect("in-memory CSV");
    }
    w.into_inner().expect("in-memory CSV")
}
