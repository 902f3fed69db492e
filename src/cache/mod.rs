//! Content-addressed store: entries, journals, locks, gc.
//!
//! Layout under the cache root:
//! - `<kind>/<key>/`: a complete entry, the node's outputs beside `meta.json`;
//! - `<kind>/<key>.partial/`: an entry being built, with its item journals;
//! - `<kind>/<key>.lock`: the lock of that entry (see [`lock`]);
//! - `<kind>/<key>.shards/`: locks and completion markers of the entry's shards (see `shard`);
//! - `names/`: per (scope, node name), the last key and its fields, so `cip plan` can say why a
//!   node reruns.
//!
//! An entry becomes visible by renaming its partial directory once everything in it is synced,
//! so a reader sees a complete entry or none. Entries are immutable; the key says what they hold.
//! Keys are lowercase hex (blake3, computed by the planner); kinds are node kinds.
//!
//! `gc` must not run alongside a run that uses entries outside its `keep` set: a reader does not
//! hold the lock of an entry it reads.

mod entry;
mod error;
mod gc;
mod journal;
pub mod lock;
mod shard;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use entry::{Builder, Entry, EntryMeta, NameRecord};
pub use error::CacheError;
pub use gc::{EntrySummary, GcItem, GcReport, GcWhat, SummaryStatus};
pub use journal::Journal;
pub use lock::{local_hostname, LockRecord, LockStatus, LockTiming, StaleReason};
pub use shard::{shard_of, ShardAcquired, ShardSpec};

use lock::{try_lock, unique_suffix, TryLock};

const META_FILE: &str = "meta.json";
const NAMES_DIR: &str = "names";
const PARTIAL_SUFFIX: &str = ".partial";
const LOCK_SUFFIX: &str = ".lock";

/// Above this many files a commit syncs the whole filesystem once (`syncfs`) instead of one
/// `fsync` per file: a generate entry can hold a million images.
const SYNCFS_ABOVE_FILES: usize = 512;

/// A cache rooted at one directory. Cheap to clone; all state is on disk.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    timing: LockTiming,
}

/// What `cip plan` needs to know about an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    Cached,
    /// A partial directory exists; `journal_records` counts the lines of its journals.
    Partial {
        journal_records: u64,
    },
    Absent,
}

/// The outcome of [`Cache::acquire`].
#[derive(Debug)]
pub enum Acquired {
    /// The entry is complete (possibly finished by another process while we waited).
    Cached(Entry),
    /// The caller builds the entry.
    Build(Builder),
}

/// On-disk form of a name record: the record plus what it is for, so a hash collision of the
/// file name cannot return another node's record.
#[derive(Serialize, Deserialize)]
struct StoredName {
    scope: String,
    node: String,
    #[serde(flatten)]
    record: NameRecord,
}

fn validate_kind(kind: &str) -> Result<(), CacheError> {
    let ok = !kind.is_empty()
        && kind.len() <= 64
        && kind != NAMES_DIR
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && kind.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(CacheError::InvalidName {
            what: "kind",
            value: kind.to_string(),
            rule: "a kind is 1-64 characters of [a-z0-9_-], starting with a letter or digit, and \
                   not \"names\"",
        })
    }
}

fn is_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn validate_key(key: &str) -> Result<(), CacheError> {
    if is_key(key) {
        Ok(())
    } else {
        Err(CacheError::InvalidName {
            what: "key",
            value: key.to_string(),
            rule: "a key is 1-128 lowercase hex digits",
        })
    }
}

/// fsync of a directory, which makes the names in it (created, renamed) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CacheError::io("sync directory", dir, e))
}

/// Makes every file and directory under `dir` durable.
pub(crate) fn sync_tree(dir: &Path) -> Result<(), CacheError> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let listing =
            fs::read_dir(&current).map_err(|e| CacheError::io("list directory", &current, e))?;
        for item in listing {
            let item = item.map_err(|e| CacheError::io("list directory", &current, e))?;
            let file_type = item
                .file_type()
                .map_err(|e| CacheError::io("stat", item.path(), e))?;
            if file_type.is_dir() {
                dirs.push(item.path());
                pending.push(item.path());
            } else if file_type.is_file() {
                files.push(item.path());
            }
        }
    }
    if files.len() > SYNCFS_ABOVE_FILES {
        let handle = File::open(dir).map_err(|e| CacheError::io("open", dir, e))?;
        // SAFETY: the descriptor is valid for the lifetime of `handle`.
        let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&handle)) };
        if rc != 0 {
            return Err(CacheError::io(
                "sync filesystem of",
                dir,
                io::Error::last_os_error(),
            ));
        }
        return Ok(());
    }
    for file in &files {
        File::open(file)
            .and_then(|f| f.sync_all())
            .map_err(|e| CacheError::io("sync file", file, e))?;
    }
    for d in dirs.iter().rev() {
        fsync_dir(d)?;
    }
    Ok(())
}

impl Cache {
    /// Creates the root if needed and checks that it is writable.
    pub fn open(root: impl Into<PathBuf>) -> Result<Cache, CacheError> {
        let root = root.into();
        let unwritable = |source: io::Error| CacheError::Unwritable {
            path: root.clone(),
            source,
        };
        if fs::metadata(&root).is_ok_and(|m| !m.is_dir()) {
            // create_dir_all would say only "File exists".
            return Err(unwritable(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "it exists and is not a directory",
            )));
        }
        fs::create_dir_all(&root).map_err(unwritable)?;
        fs::read_dir(&root).map_err(unwritable)?;
        let probe = root.join(format!(".probe-{}", unique_suffix()));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .and_then(|mut f| f.write_all(b"cip"))
            .map_err(unwritable)?;
        fs::remove_file(&probe).map_err(unwritable)?;
        Ok(Cache {
            root,
            timing: LockTiming::default(),
        })
    }

    /// The same cache with other lock timings (tests use short ones).
    pub fn with_lock_timing(mut self, timing: LockTiming) -> Cache {
        self.timing = timing;
        self
    }

    /// The same cache with another staleness timeout.
    pub fn with_stale_after(mut self, stale_after: Duration) -> Cache {
        self.timing.stale_after = stale_after;
        self
    }

    pub fn lock_timing(&self) -> LockTiming {
        self.timing
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn entry_dir(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(kind).join(key)
    }

    pub fn partial_dir(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(kind).join(format!("{key}{PARTIAL_SUFFIX}"))
    }

    pub fn lock_path(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(kind).join(format!("{key}{LOCK_SUFFIX}"))
    }

    /// A complete entry, if present.
    pub fn get(&self, kind: &str, key: &str) -> Result<Option<Entry>, CacheError> {
        validate_kind(kind)?;
        validate_key(key)?;
        entry::read_entry(kind, key, &self.entry_dir(kind, key))
    }

    /// Cheap state for `cip plan`: stat calls, plus counting journal lines of a partial entry.
    /// An invalid kind or key is reported as absent.
    pub fn state(&self, kind: &str, key: &str) -> EntryState {
        if validate_kind(kind).is_err() || !is_key(key) {
            return EntryState::Absent;
        }
        if self.entry_dir(kind, key).join(META_FILE).is_file() {
            return EntryState::Cached;
        }
        let partial = self.partial_dir(kind, key);
        let Ok(listing) = fs::read_dir(&partial) else {
            return EntryState::Absent;
        };
        let journal_records = listing
            .filter_map(Result::ok)
            .filter(|item| item.file_name().to_string_lossy().ends_with(".journal"))
            .map(|item| journal::count_lines(&item.path()))
            .sum();
        EntryState::Partial { journal_records }
    }

    /// The state of an entry's lock, if there is a lock file (for `cip plan` / `status`).
    pub fn lock_status(&self, kind: &str, key: &str) -> Result<Option<LockStatus>, CacheError> {
        validate_kind(kind)?;
        validate_key(key)?;
        Ok(lock::inspect(&self.lock_path(kind, key), &self.timing)?.map(|(_, status)| status))
    }

    /// Takes the entry's lock, waiting while a live process holds it. Returns the entry if it is
    /// complete (then without keeping the lock), else a builder for its partial directory.
    pub fn acquire(&self, kind: &str, key: &str) -> Result<Acquired, CacheError> {
        Ok(self
            .acquire_inner(kind, key, true)?
            .expect("a waiting acquire returns only once it has the lock or the entry"))
    }

    /// Like [`Cache::acquire`], but returns `None` instead of waiting for a live holder.
    pub fn try_acquire(&self, kind: &str, key: &str) -> Result<Option<Acquired>, CacheError> {
        self.acquire_inner(kind, key, false)
    }

    fn acquire_inner(
        &self,
        kind: &str,
        key: &str,
        wait: bool,
    ) -> Result<Option<Acquired>, CacheError> {
        validate_kind(kind)?;
        validate_key(key)?;
        // Entries are immutable once complete: no lock is needed to hand one out.
        if let Some(entry) = self.get(kind, key)? {
            return Ok(Some(Acquired::Cached(entry)));
        }
        let kind_dir = self.root.join(kind);
        fs::create_dir_all(&kind_dir)
            .map_err(|e| CacheError::io("create cache directory", &kind_dir, e))?;
        let lock_path = self.lock_path(kind, key);
        let mut delay = Duration::from_millis(20);
        // Log once per holder, not once per poll (heartbeats change the record).
        let mut announced: Option<Option<(String, u32, String)>> = None;
        let mut retries = 0u32;
        loop {
            match try_lock(&lock_path, &self.timing)? {
                TryLock::Acquired(guard) => return self.locked(kind, key, guard).map(Some),
                TryLock::Retry => {
                    retries += 1;
                    // Lock files vanishing under us again and again means heavy contention:
                    // yield instead of spinning.
                    if retries > 8 {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                TryLock::Held(status) => {
                    if !wait {
                        return Ok(None);
                    }
                    let holder = status
                        .holder
                        .as_ref()
                        .map(|h| (h.host.clone(), h.pid, h.token.clone()));
                    if announced.as_ref() != Some(&holder) {
                        tracing::info!(
                            "waiting for {kind}/{key}: locked by {} (last heartbeat {} s ago)",
                            status.describe_holder(),
                            status.heartbeat_age_secs
                        );
                        announced = Some(holder);
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 3 / 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Under the lock: the entry if someone finished it meanwhile, else a builder.
    fn locked(
        &self,
        kind: &str,
        key: &str,
        guard: lock::LockGuard,
    ) -> Result<Acquired, CacheError> {
        let final_dir = self.entry_dir(kind, key);
        if let Some(entry) = entry::read_entry(kind, key, &final_dir)? {
            return Ok(Acquired::Cached(entry));
        }
        // Commit renames a directory that already holds meta.json, so a final directory without
        // it was not made by cip; it would block the rename.
        if final_dir.exists() {
            tracing::warn!(
                "removing {}: an entry directory without {META_FILE} is not a cip entry",
                final_dir.display()
            );
            fs::remove_dir_all(&final_dir)
                .map_err(|e| CacheError::io("remove incomplete entry", &final_dir, e))?;
        }
        // Shards of this entry may still be journaling into its partial directory.
        self.wait_for_shards(kind, key)?;
        let partial = self.partial_dir(kind, key);
        let resumed = match fs::create_dir(&partial) {
            Ok(()) => {
                fsync_dir(&self.root.join(kind))?;
                false
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && partial.is_dir() => true,
            Err(e) => return Err(CacheError::io("create partial entry", &partial, e)),
        };
        Ok(Acquired::Build(Builder {
            kind: kind.to_string(),
            key: key.to_string(),
            partial,
            final_dir,
            resumed,
            lock: guard,
            shard: None,
        }))
    }

    fn name_path(&self, scope: &str, node: &str) -> PathBuf {
        let mut hasher = blake3::Hasher::new();
        hasher.update(scope.as_bytes());
        hasher.update(b"\0");
        hasher.update(node.as_bytes());
        let hash = hasher.finalize().to_hex();
        // The node name makes the directory readable; the hash makes the name unique and safe.
        let readable: String = node
            .chars()
            .take(48)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.root
            .join(NAMES_DIR)
            .join(format!("{readable}.{}.json", &hash[..16]))
    }

    /// Remembers the last key of a node name within a scope (an experiment file or variant).
    pub fn remember(&self, scope: &str, node: &str, record: &NameRecord) -> Result<(), CacheError> {
        let path = self.name_path(scope, node);
        let names = self.root.join(NAMES_DIR);
        fs::create_dir_all(&names).map_err(|e| CacheError::io("create directory", &names, e))?;
        let stored = StoredName {
            scope: scope.to_string(),
            node: node.to_string(),
            record: record.clone(),
        };
        let mut json = serde_json::to_vec_pretty(&stored)
            .map_err(|e| CacheError::io("serialize name record", &path, io::Error::other(e)))?;
        json.push(b'\n');
        let temp = names.join(format!(".tmp-{}", unique_suffix()));
        let written = File::create(&temp)
            .and_then(|mut f| f.write_all(&json).and_then(|()| f.sync_all()))
            .and_then(|()| fs::rename(&temp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(CacheError::io("write name record", &path, e));
        }
        Ok(())
    }

    /// The last key remembered for a node name within a scope.
    pub fn recall(&self, scope: &str, node: &str) -> Result<Option<NameRecord>, CacheError> {
        let path = self.name_path(scope, node);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::io("read name record", &path, e)),
        };
        let stored: StoredName = serde_json::from_slice(&bytes)
            .map_err(|source| CacheError::CorruptNameRecord { path, source })?;
        Ok((stored.scope == scope && stored.node == node).then_some(stored.record))
    }
}
