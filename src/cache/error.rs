//! Errors of the cache. Every message names the path involved and says what to do about it.
//!
//! Messages include their underlying cause, so printing an error with `{}` tells the whole story.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "cache directory {path} is not usable: {source}. Choose another cache directory with \
         --cache <DIR> or the CIP_CACHE environment variable, or make {path} a writable directory"
    )]
    Unwritable { path: PathBuf, source: io::Error },

    #[error(
        "cannot {action} {path}: {source}. Check that the cache filesystem is mounted, writable \
         and not full"
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },

    #[error(
        "cache entry metadata {path} is unreadable: {source}. Remove the entry directory {} so \
         that cip recomputes it",
        entry_dir.display()
    )]
    CorruptMeta {
        path: PathBuf,
        entry_dir: PathBuf,
        source: serde_json::Error,
    },

    #[error(
        "journal {path} is damaged at line {line} ({reason}), and valid records follow it, so \
         this is not a torn write from a crash. Remove the partial entry {} to recompute it",
        partial_dir.display()
    )]
    CorruptJournal {
        path: PathBuf,
        partial_dir: PathBuf,
        line: u64,
        reason: String,
    },

    #[error(
        "journal record for {path} must be a JSON object with a string \"item\" field, got {record}"
    )]
    InvalidJournalRecord { path: PathBuf, record: String },

    #[error(
        "name record {path} is unreadable: {source}. Remove it; `cip plan` only loses the \
         explanation of why that node reruns"
    )]
    CorruptNameRecord {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error(
        "invalid cache {what} {value:?}: {rule}. This is a bug in the caller of the cache, not \
         in the cache directory"
    )]
    InvalidName {
        what: &'static str,
        value: String,
        rule: &'static str,
    },

    #[error(
        "entry metadata for {kind}/{key} says {meta_kind}/{meta_key}; the builder of an entry must \
         commit metadata for that same entry"
    )]
    MetaMismatch {
        kind: String,
        key: String,
        meta_kind: String,
        meta_key: String,
    },

    #[error(
        "lost the lock {path}: another process judged it stale and took it over (was this \
         process suspended for longer than the {stale_after_secs} s staleness timeout?). The \
         entry was not committed; its partial directory is kept, run again to resume"
    )]
    LockLost {
        path: PathBuf,
        stale_after_secs: u64,
    },

    #[error(
        "the builder of {kind}/{key} {shard} cannot commit the entry: shards only journal; \
         the finaliser (a builder of the whole entry) commits it"
    )]
    ShardCommit {
        kind: String,
        key: String,
        shard: String,
    },

    #[error("the builder of {kind}/{key} builds the whole entry, not a shard")]
    NotAShard { kind: String, key: String },
}

impl CacheError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        CacheError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
