//! Shards: one entry built by several processes (or threads) at once, then finalised.
//!
//! **Assignment.** Item `id` belongs to shard `u64::from_le_bytes(blake3(id)[..8]) % count`. The
//! hash depends on the id alone, so any number of shards covers every item exactly once, and an
//! item's result (per-item seeds) never depends on the split.
//!
//! **Layout** next to the entry, `<kind>/<key>.shards/`:
//! - `<i>-of-<n>.lock`: the lock of shard `i` of `n` (same lock files as entries: host, pid,
//!   heartbeat), so the shards of one entry run concurrently;
//! - `<i>-of-<n>.done`: written when that shard has journaled all its items.
//!
//! Lock files live outside `<key>.partial/`: the finaliser renames the partial directory, and
//! a lock created inside it at that moment would travel into the immutable entry.
//!
//! A shard journals into `<key>.partial/<base>.shard-<i>-of-<n>.journal`: one file per shard, so
//! writers on different hosts never append to the same file. The done set of a node is the union
//! of every journal of its base name, whatever split wrote them.
//!
//! **Protocol.** A shard worker takes its shard lock, *then* checks the entry lock; a finaliser
//! (any builder of the entry) takes the entry lock, *then* waits until no live shard lock is left.
//! Each side acts after making itself visible, so at least one sees the other: a shard never
//! writes into a partial directory that is being committed. A shard that finds the entry lock
//! held backs off ([`ShardAcquired::Busy`]) and retries later.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::entry::{read_entry, Builder, Entry};
use super::error::CacheError;
use super::journal::read_records;
use super::lock::{self, try_lock, TryLock};
use super::{validate_key, validate_kind, Cache, LockStatus};

/// Shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardSpec {
    pub index: u32,
    pub count: u32,
}

impl fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {} of {}", self.index, self.count)
    }
}

/// The shard an item id belongs to among `count` shards (see the module comment).
pub fn shard_of(item: &str, count: u32) -> u32 {
    let hash = blake3::hash(item.as_bytes());
    let head = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
    (head % u64::from(count.max(1))) as u32
}

impl ShardSpec {
    /// None unless `index < count`.
    pub fn new(index: u32, count: u32) -> Option<ShardSpec> {
        (index < count).then_some(ShardSpec { index, count })
    }

    pub fn owns(&self, item: &str) -> bool {
        shard_of(item, self.count) == self.index
    }

    /// The journal name of this shard for a node's journal `base` (e.g. `images`).
    pub fn journal_name(&self, base: &str) -> String {
        format!("{base}.shard-{}-of-{}", self.index, self.count)
    }

    fn file_stem(&self) -> String {
        format!("{}-of-{}", self.index, self.count)
    }
}

/// The outcome of [`Cache::acquire_shard`].
#[derive(Debug)]
pub enum ShardAcquired {
    /// The entry is complete: nothing left to do.
    Cached(Entry),
    /// A live process holds the entry lock (a finaliser or a whole-node run): try again later.
    Busy(LockStatus),
    /// The caller builds this shard; the builder cannot commit.
    Build(Builder),
}

impl Cache {
    /// `<kind>/<key>.shards/`: shard locks and completion markers.
    pub fn shards_dir(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(kind).join(format!("{key}{SHARDS_SUFFIX}"))
    }

    fn shard_file(&self, kind: &str, key: &str, spec: ShardSpec, ext: &str) -> PathBuf {
        self.shards_dir(kind, key)
            .join(format!("{}.{ext}", spec.file_stem()))
    }

    /// The completion marker of a shard; it exists once the shard journaled all its items.
    pub fn shard_marker(&self, kind: &str, key: &str, spec: ShardSpec) -> PathBuf {
        self.shard_file(kind, key, spec, "done")
    }

    pub fn shard_done(&self, kind: &str, key: &str, spec: ShardSpec) -> bool {
        self.shard_marker(kind, key, spec).is_file()
    }

    /// Takes shard `spec` of an entry, waiting while a live process holds that same shard.
    pub fn acquire_shard(
        &self,
        kind: &str,
        key: &str,
        spec: ShardSpec,
    ) -> Result<ShardAcquired, CacheError> {
        validate_kind(kind)?;
        validate_key(key)?;
        if let Some(entry) = self.get(kind, key)? {
            return Ok(ShardAcquired::Cached(entry));
        }
        let shards = self.shards_dir(kind, key);
        fs::create_dir_all(&shards)
            .map_err(|e| CacheError::io("create shard directory", &shards, e))?;
        let lock_path = self.shard_file(kind, key, spec, "lock");
        let mut delay = Duration::from_millis(20);
        let guard = loop {
            match try_lock(&lock_path, &self.timing)? {
                TryLock::Acquired(guard) => break guard,
                TryLock::Retry => {}
                TryLock::Held(status) => {
                    tracing::info!(
                        "waiting for {kind}/{key} {spec}: held by {}",
                        status.describe_holder()
                    );
                    std::thread::sleep(delay);
                    delay = (delay * 3 / 2).min(Duration::from_secs(1));
                }
            }
        };
        // Now that our shard lock is visible, look at the entry lock (see the module comment).
        if let Some((_, status)) = lock::inspect(&self.lock_path(kind, key), &self.timing)? {
            if status.alive() {
                return Ok(ShardAcquired::Busy(status));
            }
        }
        let final_dir = self.entry_dir(kind, key);
        if let Some(entry) = read_entry(kind, key, &final_dir)? {
            return Ok(ShardAcquired::Cached(entry));
        }
        let partial = self.partial_dir(kind, key);
        let resumed = partial.is_dir();
        fs::create_dir_all(&partial)
            .map_err(|e| CacheError::io("create partial entry", &partial, e))?;
        Ok(ShardAcquired::Build(Builder {
            kind: kind.to_string(),
            key: key.to_string(),
            partial,
            final_dir,
            resumed,
            lock: guard,
            shard: Some(spec),
        }))
    }

    /// Waits until no live process holds a shard lock of the entry, and removes stale shard
    /// locks. Called by a builder of the whole entry, after taking the entry lock.
    pub(crate) fn wait_for_shards(&self, kind: &str, key: &str) -> Result<(), CacheError> {
        let dir = self.shards_dir(kind, key);
        let mut delay = Duration::from_millis(20);
        let mut announced = false;
        loop {
            let mut live = None;
            let listing = match fs::read_dir(&dir) {
                Ok(listing) => listing,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(CacheError::io("list shard directory", &dir, e)),
            };
            for item in listing {
                let item = item.map_err(|e| CacheError::io("list shard directory", &dir, e))?;
                let path = item.path();
                if !item.file_name().to_string_lossy().ends_with(".lock") {
                    continue;
                }
                match lock::inspect(&path, &self.timing)? {
                    Some((_, status)) if status.alive() => live = Some((path, status)),
                    Some((raw, _)) => lock::take_over(&path, &raw)?,
                    None => {}
                }
            }
            let Some((path, status)) = live else {
                return Ok(());
            };
            if !announced {
                tracing::info!(
                    "waiting for {}: a shard held by {} is still running",
                    path.display(),
                    status.describe_holder()
                );
                announced = true;
            }
            std::thread::sleep(delay);
            delay = (delay * 3 / 2).min(Duration::from_secs(1));
        }
    }
}

pub(crate) const SHARDS_SUFFIX: &str = ".shards";

impl Builder {
    /// The shard this builder builds, if it builds one shard rather than the entry.
    pub fn shard(&self) -> Option<ShardSpec> {
        self.shard
    }

    /// Every record of every journal of base name `base` in the partial directory: `<base>` and
    /// all its shard journals, read without modifying them (other shards may be appending). A
    /// torn tail is ignored. Files are read in name order.
    pub fn journal_records(&self, base: &str) -> Result<Vec<Value>, CacheError> {
        let mut paths = Vec::new();
        let listing = fs::read_dir(&self.partial)
            .map_err(|e| CacheError::io("list partial entry", &self.partial, e))?;
        let shard_prefix = format!("{base}.shard-");
        for item in listing {
            let item = item.map_err(|e| CacheError::io("list partial entry", &self.partial, e))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".journal") else {
                continue;
            };
            if stem == base || stem.starts_with(&shard_prefix) {
                paths.push(item.path());
            }
        }
        paths.sort();
        let mut records = Vec::new();
        for path in paths {
            records.extend(read_records(&path)?);
        }
        Ok(records)
    }

    /// The item ids recorded in any journal of base name `base`.
    pub fn journal_done(&self, base: &str) -> Result<HashSet<String>, CacheError> {
        Ok(self
            .journal_records(base)?
            .iter()
            .filter_map(|r| r.get("item").and_then(Value::as_str).map(str::to_string))
            .collect())
    }

    /// Writes the completion marker of this builder's shard (durably). Errors on an entry
    /// builder.
    pub fn mark_shard_done(&self, cache: &Cache) -> Result<PathBuf, CacheError> {
        let spec = self.shard.ok_or_else(|| CacheError::NotAShard {
            kind: self.kind.clone(),
            key: self.key.clone(),
        })?;
        self.lock.check_owned()?;
        let marker = cache.shard_marker(&self.kind, &self.key, spec);
        write_durably(&marker, b"done\n")?;
        Ok(marker)
    }
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| CacheError::io("create", path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| CacheError::io("write", path, e))?;
    if let Some(parent) = path.parent() {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| CacheError::io("sync directory", parent, e))?;
    }
    Ok(())
}
