//! Datasets (ImageFolder), class lists, CSV manifests.
//!
//! CSV is the manifest format between nodes: it opens in anything, and every artifact's rows carry
//! a stable `id` so that outputs can be sorted, merged and resumed independently of order.

pub mod classes;
pub mod imagefolder;
pub mod table;

pub use classes::ClassNames;
pub use table::CsvTable;

use std::path::PathBuf;

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
}
