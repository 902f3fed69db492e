//! Complete entries, their metadata, name records, and the builder that turns a partial directory
//! into an entry.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::CacheError;
use super::journal::Journal;
use super::lock::LockGuard;
use super::{fsync_dir, sync_tree, META_FILE};

/// A complete entry: `dir` holds the node's outputs beside `meta.json`. Entries never change
/// after commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub kind: String,
    pub key: String,
    pub dir: PathBuf,
    pub meta: EntryMeta,
}

impl Entry {
    /// Path of an output file inside the entry.
    pub fn path(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.dir.join(relative)
    }
}

/// `meta.json` of an entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryMeta {
    pub kind: String,
    pub key: String,
    pub node: String,
    /// The canonical key inputs, for humans and `cip plan`.
    pub key_fields: serde_json::Value,
    pub started_unix: u64,
    pub finished_unix: u64,
    pub elapsed_secs: f64,
    pub cip_version: String,
    /// E.g. items, skipped.
    pub counts: BTreeMap<String, u64>,
    pub extra: serde_json::Value,
}

/// What `cip plan` remembers per (scope, node name): the last key and its fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NameRecord {
    pub kind: String,
    pub key: String,
    pub key_fields: serde_json::Value,
}

/// Reads the entry in `dir` if it is complete.
pub(crate) fn read_entry(kind: &str, key: &str, dir: &Path) -> Result<Option<Entry>, CacheError> {
    let meta_path = dir.join(META_FILE);
    let bytes = match fs::read(&meta_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CacheError::io("read entry metadata", meta_path, e)),
    };
    let meta: EntryMeta =
        serde_json::from_slice(&bytes).map_err(|source| CacheError::CorruptMeta {
            path: meta_path.clone(),
            entry_dir: dir.to_path_buf(),
            source,
        })?;
    Ok(Some(Entry {
        kind: kind.to_string(),
        key: key.to_string(),
        dir: dir.to_path_buf(),
        meta,
    }))
}

/// The right to build one entry: holds its lock (released on drop) and its partial directory.
/// Dropping without commit keeps the partial directory, so the next run resumes from its
/// journals.
pub struct Builder {
    pub(crate) kind: String,
    pub(crate) key: String,
    pub(crate) partial: PathBuf,
    pub(crate) final_dir: PathBuf,
    pub(crate) resumed: bool,
    pub(crate) lock: LockGuard,
    /// Set for the builder of one shard ([`super::Cache::acquire_shard`]): it holds the shard's
    /// lock, not the entry's, and cannot commit.
    pub(crate) shard: Option<super::ShardSpec>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("kind", &self.kind)
            .field("key", &self.key)
            .field("partial", &self.partial)
            .field("resumed", &self.resumed)
            .field("shard", &self.shard)
            .field("lock", &self.lock.path())
            .finish()
    }
}

impl Builder {
    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// `<key>.partial/`, where the node writes its outputs.
    pub fn dir(&self) -> &Path {
        &self.partial
    }

    /// True when the partial directory was left by an earlier, interrupted run.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Opens `<partial>/<name>.journal`.
    pub fn journal(&self, name: &str) -> Result<Journal, CacheError> {
        let valid = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains(['/', '\\', '\0'])
            && name != META_FILE;
        if !valid {
            return Err(CacheError::InvalidName {
                what: "journal name",
                value: name.to_string(),
                rule: "a journal name is a plain file name: not empty, no '/', no leading '.'",
            });
        }
        Journal::open(&self.partial.join(format!("{name}.journal")))
    }

    /// Writes `meta.json`, makes every file durable, and renames the partial directory into the
    /// entry in one step; then releases the lock.
    pub fn commit(self, meta: EntryMeta) -> Result<Entry, CacheError> {
        if let Some(spec) = self.shard {
            return Err(CacheError::ShardCommit {
                kind: self.kind.clone(),
                key: self.key.clone(),
                shard: spec.to_string(),
            });
        }
        if meta.kind != self.kind || meta.key != self.key {
            return Err(CacheError::MetaMismatch {
                kind: self.kind.clone(),
                key: self.key.clone(),
                meta_kind: meta.kind,
                meta_key: meta.key,
            });
        }
        let meta_path = self.partial.join(META_FILE);
        let mut json = serde_json::to_vec_pretty(&meta).map_err(|e| {
            CacheError::io("serialize entry metadata", &meta_path, io::Error::other(e))
        })?;
        json.push(b'\n');
        File::create(&meta_path)
            .and_then(|mut f| f.write_all(&json).and_then(|()| f.sync_all()))
            .map_err(|e| CacheError::io("write entry metadata", &meta_path, e))?;
        sync_tree(&self.partial)?;
        // A builder whose lock was taken over must not publish: the taker may be writing into
        // the same partial directory.
        self.lock.check_owned()?;
        fs::rename(&self.partial, &self.final_dir)
            .map_err(|e| CacheError::io("rename partial entry into place", &self.partial, e))?;
        if let Some(parent) = self.final_dir.parent() {
            fsync_dir(parent)?;
        }
        // Shard locks and markers served their purpose once the entry exists.
        let shards =
            self.final_dir
                .with_file_name(format!("{}{}", self.key, super::shard::SHARDS_SUFFIX));
        if let Err(e) = fs::remove_dir_all(&shards) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::debug!("could not remove {}: {e}", shards.display());
            }
        }
        let entry = Entry {
            kind: self.kind.clone(),
            key: self.key.clone(),
            dir: self.final_dir.clone(),
            meta,
        };
        drop(self);
        Ok(entry)
    }
}
