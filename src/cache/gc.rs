//! Listing (`cip status`) and garbage collection (`cip gc`).
//!
//! Only names that cip creates are touched: `<key>/`, `<key>.partial/`, `<key>.lock` and the
//! debris of interrupted operations (`*.lock.stale-*`, `*.lock.hb-*`, `<key>.gc-*`, and the
//! `<key>.shards/` directory of shard locks and markers). Anything
//! else found in the cache is left alone.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::error::CacheError;
use super::lock::{self, unique_suffix, unix_now, LockStatus, TryLock};
use super::{entry, is_key, journal, Cache, LOCK_SUFFIX, META_FILE, NAMES_DIR, PARTIAL_SUFFIX};

/// One thing in the cache, for `cip status`.
#[derive(Debug, Clone, PartialEq)]
pub struct EntrySummary {
    pub kind: String,
    pub key: String,
    pub path: PathBuf,
    pub status: SummaryStatus,
    /// Space used on disk (allocated blocks), recursively.
    pub bytes: u64,
    /// Seconds since the entry was finished, the partial last changed, or the lock was taken.
    pub age_secs: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SummaryStatus {
    Complete {
        node: String,
    },
    Partial {
        journal_records: u64,
    },
    Lock(LockStatus),
    /// Left over by an interrupted takeover, heartbeat or gc; gc removes it once old.
    Debris,
    /// An entry directory whose metadata is missing or unreadable; gc removes it when it is not
    /// referenced.
    Damaged {
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GcWhat {
    Entry,
    Partial,
    StaleLock,
    Debris,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GcItem {
    pub kind: String,
    pub key: String,
    pub what: GcWhat,
    pub path: PathBuf,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GcReport {
    pub dry_run: bool,
    /// What was removed (or, in a dry run, would be).
    pub removed: Vec<GcItem>,
    /// Unreferenced entries left alone because a live process holds their lock.
    pub skipped_locked: Vec<(String, String, LockStatus)>,
    /// Complete entries kept because they are referenced.
    pub kept_entries: usize,
    pub bytes_freed: u64,
}

/// What a name inside a kind directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Final,
    Partial,
    Lock,
    Debris,
}

fn classify(name: &str) -> Option<(String, Role)> {
    if is_key(name) {
        return Some((name.to_string(), Role::Final));
    }
    if let Some(key) = name.strip_suffix(PARTIAL_SUFFIX) {
        return is_key(key).then(|| (key.to_string(), Role::Partial));
    }
    if let Some(key) = name.strip_suffix(LOCK_SUFFIX) {
        return is_key(key).then(|| (key.to_string(), Role::Lock));
    }
    for marker in [".lock.stale-", ".lock.hb-", ".gc-", ".shards"] {
        if let Some(at) = name.find(marker) {
            let key = &name[..at];
            return is_key(key).then(|| (key.to_string(), Role::Debris));
        }
    }
    None
}

/// Allocated bytes of a file or directory tree, without following symlinks.
fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    let Ok(listing) = fs::read_dir(path) else {
        return own;
    };
    own + listing
        .filter_map(Result::ok)
        .map(|item| disk_usage(&item.path()))
        .sum::<u64>()
}

fn age_of(path: &Path) -> u64 {
    let mtime = fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::now());
    let secs = mtime
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    unix_now().saturating_sub(secs)
}

/// Everything of one key in one kind directory.
#[derive(Default)]
struct KeyFiles {
    final_dir: Option<PathBuf>,
    partial: Option<PathBuf>,
    lock: Option<PathBuf>,
    debris: Vec<PathBuf>,
}

fn remove_path(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

impl Cache {
    /// Kind directories and their contents grouped by key, in sorted order.
    fn scan(&self) -> Result<BTreeMap<String, BTreeMap<String, KeyFiles>>, CacheError> {
        let mut kinds = BTreeMap::new();
        let listing = fs::read_dir(self.root())
            .map_err(|e| CacheError::io("list cache directory", self.root(), e))?;
        for kind_item in listing {
            let kind_item =
                kind_item.map_err(|e| CacheError::io("list cache directory", self.root(), e))?;
            let kind = kind_item.file_name().to_string_lossy().into_owned();
            if kind == NAMES_DIR || kind.starts_with('.') || super::validate_kind(&kind).is_err() {
                continue;
            }
            if !kind_item.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let kind_dir = kind_item.path();
            let mut keys: BTreeMap<String, KeyFiles> = BTreeMap::new();
            let items = fs::read_dir(&kind_dir)
                .map_err(|e| CacheError::io("list cache directory", &kind_dir, e))?;
            for item in items {
                let item =
                    item.map_err(|e| CacheError::io("list cache directory", &kind_dir, e))?;
                let name = item.file_name().to_string_lossy().into_owned();
                let Some((key, role)) = classify(&name) else {
                    continue;
                };
                let files = keys.entry(key).or_default();
                let path = item.path();
                match role {
                    Role::Final => files.final_dir = Some(path),
                    Role::Partial => files.partial = Some(path),
                    Role::Lock => files.lock = Some(path),
                    Role::Debris => files.debris.push(path),
                }
            }
            kinds.insert(kind, keys);
        }
        Ok(kinds)
    }

    /// Every entry, partial entry, lock and piece of debris in the cache.
    pub fn list(&self) -> Result<Vec<EntrySummary>, CacheError> {
        let mut out = Vec::new();
        for (kind, keys) in self.scan()? {
            for (key, files) in keys {
                let summary = |path: &Path, status: SummaryStatus, age_secs: u64| EntrySummary {
                    kind: kind.clone(),
                    key: key.clone(),
                    path: path.to_path_buf(),
                    status,
                    bytes: disk_usage(path),
                    age_secs,
                };
                if let Some(dir) = &files.final_dir {
                    match entry::read_entry(&kind, &key, dir) {
                        Ok(Some(entry)) => {
                            let age = unix_now().saturating_sub(entry.meta.finished_unix);
                            let node = entry.meta.node;
                            out.push(summary(dir, SummaryStatus::Complete { node }, age));
                        }
                        // The next acquire removes a directory without meta.json.
                        Ok(None) => out.push(summary(
                            dir,
                            SummaryStatus::Damaged {
                                reason: format!("no {META_FILE}"),
                            },
                            age_of(dir),
                        )),
                        Err(e) => out.push(summary(
                            dir,
                            SummaryStatus::Damaged {
                                reason: e.to_string(),
                            },
                            age_of(dir),
                        )),
                    }
                }
                if let Some(dir) = &files.partial {
                    let journal_records = fs::read_dir(dir)
                        .map(|listing| {
                            listing
                                .filter_map(Result::ok)
                                .filter(|i| i.file_name().to_string_lossy().ends_with(".journal"))
                                .map(|i| journal::count_lines(&i.path()))
                                .sum()
                        })
                        .unwrap_or(0);
                    out.push(summary(
                        dir,
                        SummaryStatus::Partial { journal_records },
                        age_of(dir),
                    ));
                }
                if let Some(path) = &files.lock {
                    if let Some((_, status)) = lock::inspect(path, &self.lock_timing())? {
                        let age = status.holder.as_ref().map_or_else(
                            || age_of(path),
                            |h| unix_now().saturating_sub(h.started_unix),
                        );
                        out.push(summary(path, SummaryStatus::Lock(status), age));
                    }
                }
                for path in &files.debris {
                    out.push(summary(path, SummaryStatus::Debris, age_of(path)));
                }
            }
        }
        Ok(out)
    }

    /// Removes complete and partial entries whose (kind, key) is not in `keep`, stale locks, and
    /// old debris. An entry whose lock a live process holds is never touched. Removal happens
    /// under the entry's lock, so no builder can start on it meanwhile. `dry_run` only reports.
    pub fn gc(
        &self,
        keep: &HashSet<(String, String)>,
        dry_run: bool,
    ) -> Result<GcReport, CacheError> {
        let timing = self.lock_timing();
        let mut report = GcReport {
            dry_run,
            removed: Vec::new(),
            skipped_locked: Vec::new(),
            kept_entries: 0,
            bytes_freed: 0,
        };
        for (kind, keys) in self.scan()? {
            for (key, files) in keys {
                let item = |what: GcWhat, path: &Path| GcItem {
                    kind: kind.clone(),
                    key: key.clone(),
                    what,
                    path: path.to_path_buf(),
                    bytes: disk_usage(path),
                };
                let referenced = keep.contains(&(kind.clone(), key.clone()));
                let has_data = files.final_dir.is_some() || files.partial.is_some();
                if referenced && files.final_dir.is_some() {
                    report.kept_entries += 1;
                }

                let lock_state = match &files.lock {
                    Some(path) => lock::inspect(path, &timing)?,
                    None => None,
                };
                if let Some((_, status)) = &lock_state {
                    if status.alive() {
                        if !referenced && has_data {
                            report
                                .skipped_locked
                                .push((kind.clone(), key.clone(), status.clone()));
                        }
                        // A live holder may be using its debris (heartbeat temp files).
                        continue;
                    }
                    report
                        .removed
                        .push(item(GcWhat::StaleLock, files.lock.as_deref().unwrap()));
                }

                let mut doomed = Vec::new();
                if !referenced {
                    if let Some(dir) = &files.final_dir {
                        doomed.push(item(GcWhat::Entry, dir));
                    }
                    if let Some(dir) = &files.partial {
                        doomed.push(item(GcWhat::Partial, dir));
                    }
                }
                let old_debris: Vec<GcItem> = files
                    .debris
                    .iter()
                    .filter(|p| age_of(p) > timing.stale_after.as_secs())
                    .map(|p| item(GcWhat::Debris, p))
                    .collect();

                if dry_run {
                    report.removed.extend(doomed);
                    report.removed.extend(old_debris);
                    continue;
                }

                let lock_path = self.lock_path(&kind, &key);
                if doomed.is_empty() {
                    if let Some((raw, _)) = &lock_state {
                        lock::take_over(&lock_path, raw)?;
                    }
                } else {
                    // Taking the lock also takes over a stale one.
                    let guard = loop {
                        match lock::try_lock(&lock_path, &timing)? {
                            TryLock::Acquired(guard) => break Some(guard),
                            TryLock::Retry => continue,
                            TryLock::Held(status) => {
                                report
                                    .skipped_locked
                                    .push((kind.clone(), key.clone(), status));
                                break None;
                            }
                        }
                    };
                    let Some(guard) = guard else {
                        continue;
                    };
                    for doomed_item in doomed {
                        let path = &doomed_item.path;
                        if doomed_item.what == GcWhat::Entry {
                            // Out of sight first, so no reader finds a half-deleted entry.
                            let trash =
                                path.with_file_name(format!("{key}.gc-{}", unique_suffix()));
                            fs::rename(path, &trash)
                                .map_err(|e| CacheError::io("move entry out of sight", path, e))?;
                            remove_path(&trash)
                                .map_err(|e| CacheError::io("remove entry", &trash, e))?;
                        } else {
                            remove_path(path)
                                .map_err(|e| CacheError::io("remove partial entry", path, e))?;
                        }
                        report.removed.push(doomed_item);
                    }
                    drop(guard);
                }
                for debris in old_debris {
                    match remove_path(&debris.path) {
                        Ok(()) => report.removed.push(debris),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(CacheError::io("remove", &debris.path, e)),
                    }
                }
            }
        }
        report.bytes_freed = report.removed.iter().map(|i| i.bytes).sum();
        // A removed entry's directory name may only disappear for good once the kind directory
        // is synced.
        if !dry_run {
            for kind in report
                .removed
                .iter()
                .map(|i| &i.kind)
                .collect::<HashSet<_>>()
            {
                super::fsync_dir(&self.root().join(kind))?;
            }
        }
        Ok(report)
    }
}
