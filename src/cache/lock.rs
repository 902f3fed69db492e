//! Entry locks that hold across hosts on shared (NFS-like) filesystems.
//!
//! `flock`/`fcntl` locks are unreliable on network filesystems, so a lock is a file created with
//! `O_EXCL` (`create_new`), which NFSv3+ implements atomically on the server. The file holds a JSON
//! [`LockRecord`]. While held, a background thread rewrites it every few seconds (temp file +
//! rename) with a fresh `heartbeat_unix`. A lock is stale when its holder runs on this machine and
//! its process is gone, or when its heartbeat is older than the staleness timeout (the only
//! evidence available about a holder on another host).
//!
//! Takeover renames the stale file aside under a unique name, then competes with `create_new`
//! like any acquirer, so of two processes taking over at once only one wins. If the file renamed
//! aside turns out not to be the one judged stale (another taker replaced it in between), it is
//! linked back into place.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::error::CacheError;

/// How often a held lock is refreshed and how old a heartbeat may get before the lock is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockTiming {
    pub heartbeat_every: Duration,
    pub stale_after: Duration,
}

impl Default for LockTiming {
    fn default() -> Self {
        LockTiming {
            heartbeat_every: Duration::from_secs(5),
            stale_after: Duration::from_secs(120),
        }
    }
}

impl LockTiming {
    /// A heartbeat must come several times within the staleness window, or a slow filesystem
    /// could make a live lock look stale.
    pub(crate) fn effective_heartbeat(&self) -> Duration {
        self.heartbeat_every
            .min(self.stale_after / 4)
            .max(Duration::from_millis(10))
    }
}

/// The content of a lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub host: String,
    pub pid: u32,
    pub started_unix: u64,
    pub heartbeat_unix: u64,
    pub cip_version: String,
    /// Unique per acquisition: two threads of one process are told apart by it, and a holder
    /// checks it before refreshing or removing the file ("is it still mine?").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    /// Start time of the holder process (Linux clock ticks since boot), so a recycled pid is not
    /// mistaken for a live holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
    /// PID namespace of the holder: containers sharing a hostname but not a pid namespace must not
    /// judge each other's pids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<String>,
}

/// Why a lock may be taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// The holder ran on this machine and its process no longer exists.
    DeadProcess,
    /// The last heartbeat is older than the staleness timeout.
    HeartbeatExpired,
    /// The file is not a valid lock record (crash right after creating it) and is older than
    /// the staleness timeout.
    Unreadable,
}

/// What a lock file says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockStatus {
    /// None when the file is not a valid lock record.
    pub holder: Option<LockRecord>,
    /// Seconds since the most recent sign of life (heartbeat field or file mtime).
    pub heartbeat_age_secs: u64,
    /// Some when the lock may be taken over.
    pub stale: Option<StaleReason>,
}

impl LockStatus {
    pub fn alive(&self) -> bool {
        self.stale.is_none()
    }

    /// "pid 123 on host-a" for log lines.
    pub fn describe_holder(&self) -> String {
        match &self.holder {
            Some(h) => format!("pid {} on {}", h.pid, h.host),
            None => "an unreadable lock file".to_string(),
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The name of this machine, as recorded in lock files.
pub fn local_hostname() -> String {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success
        // (or truncates, which the search for NUL below tolerates).
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        if rc != 0 {
            return "unknown-host".to_string();
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    })
    .clone()
}

fn local_pid_ns() -> Option<String> {
    static NS: OnceLock<Option<String>> = OnceLock::new();
    NS.get_or_init(|| {
        fs::read_link("/proc/self/ns/pid")
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    })
    .clone()
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/<pid>/stat).
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields resume after the
    // last ')'. Field 3 is the first one after it, so field 22 is the 20th.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Whether a process of this machine is alive. `kill(pid, 0)` fails with ESRCH exactly when no
/// such process exists (EPERM means it exists but belongs to someone else).
fn process_alive(pid: u32, recorded_start: Option<u64>) -> bool {
    // pid 0 and "negative" pids would address process groups, never a single holder.
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 performs only the existence and permission checks.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    match (recorded_start, process_start_ticks(pid)) {
        (Some(recorded), Some(current)) => recorded == current,
        _ => true,
    }
}

fn same_machine(record: &LockRecord) -> bool {
    if record.host != local_hostname() {
        return false;
    }
    match (&record.pid_ns, local_pid_ns()) {
        (Some(theirs), Some(ours)) => *theirs == ours,
        _ => true,
    }
}

/// A name no other process or thread will produce: for lock tokens and temp files.
pub(crate) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Judges a lock file's content. `mtime` is the file's modification time.
pub(crate) fn judge(raw: &[u8], mtime: SystemTime, timing: &LockTiming) -> LockStatus {
    let now = unix_now();
    let holder: Option<LockRecord> = serde_json::from_slice(raw).ok();
    // Either clock may be behind; the freshest sign of life counts, so a skewed clock delays a
    // takeover instead of stealing a live lock.
    let last_sign = holder
        .as_ref()
        .map_or(0, |h| h.heartbeat_unix)
        .max(unix_secs(mtime));
    let heartbeat_age_secs = now.saturating_sub(last_sign);
    let expired = heartbeat_age_secs > timing.stale_after.as_secs();
    let stale = match &holder {
        None if expired => Some(StaleReason::Unreadable),
        None => None,
        Some(h) if same_machine(h) && !process_alive(h.pid, h.pid_start) => {
            Some(StaleReason::DeadProcess)
        }
        Some(_) if expired => Some(StaleReason::HeartbeatExpired),
        Some(_) => None,
    };
    LockStatus {
        holder,
        heartbeat_age_secs,
        stale,
    }
}

/// Reads and judges a lock file; None when there is no lock file.
pub(crate) fn inspect(
    path: &Path,
    timing: &LockTiming,
) -> Result<Option<(Vec<u8>, LockStatus)>, CacheError> {
    let raw = match fs::read(path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CacheError::io("read lock", path, e)),
    };
    let mtime = match fs::metadata(path) {
        Ok(m) => m.modified().unwrap_or(UNIX_EPOCH),
        // Replaced between the two calls: the content read is of a lock that was just written.
        Err(e) if e.kind() == io::ErrorKind::NotFound => SystemTime::now(),
        Err(e) => return Err(CacheError::io("stat lock", path, e)),
    };
    let status = judge(&raw, mtime, timing);
    Ok(Some((raw, status)))
}

fn read_token(path: &Path) -> Option<String> {
    let raw = fs::read(path).ok()?;
    serde_json::from_slice::<LockRecord>(&raw)
        .ok()
        .map(|r| r.token)
}

/// Removes a lock judged stale from its content `judged`. Safe against concurrent takers: see the
/// module comment.
pub(crate) fn take_over(path: &Path, judged: &[u8]) -> Result<(), CacheError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let aside = path.with_file_name(format!("{file_name}.stale-{}", unique_suffix()));
    match fs::rename(path, &aside) {
        Ok(()) => {}
        // Someone else already removed or took it over.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CacheError::io("move aside stale lock", path, e)),
    }
    let moved = fs::read(&aside).unwrap_or_default();
    if moved != judged {
        // We moved a lock that was created (or refreshed) after we judged: put it back unless a
        // third process has already created a new one. `hard_link` fails if the target exists.
        match fs::hard_link(&aside, path) {
            Ok(()) => tracing::debug!("restored lock {} moved aside by mistake", path.display()),
            Err(e) => tracing::warn!(
                "lock {} was replaced while being taken over and could not be restored ({e}); \
                 its holder will notice at its next heartbeat",
                path.display()
            ),
        }
    }
    let _ = fs::remove_file(&aside);
    Ok(())
}

/// A held lock. Dropping it stops the heartbeat and removes the file if it is still ours.
pub(crate) struct LockGuard {
    path: PathBuf,
    token: String,
    lost: Arc<AtomicBool>,
    stop: Option<mpsc::Sender<()>>,
    heartbeat: Option<JoinHandle<()>>,
    timing: LockTiming,
}

pub(crate) enum TryLock {
    Acquired(LockGuard),
    /// Held by a live holder.
    Held(LockStatus),
    /// The lock changed under us (released, or stale and moved aside): try again at once.
    Retry,
}

/// One attempt at taking the lock at `path`.
pub(crate) fn try_lock(path: &Path, timing: &LockTiming) -> Result<TryLock, CacheError> {
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(file) => Ok(TryLock::Acquired(LockGuard::start(path, file, *timing)?)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match inspect(path, timing)? {
            None => Ok(TryLock::Retry),
            Some((raw, status)) if !status.alive() => {
                tracing::info!(
                    "taking over stale lock {} ({}, {:?})",
                    path.display(),
                    status.describe_holder(),
                    status.stale
                );
                take_over(path, &raw)?;
                Ok(TryLock::Retry)
            }
            Some((_, status)) => Ok(TryLock::Held(status)),
        },
        Err(e) => Err(CacheError::io("create lock", path, e)),
    }
}

fn new_record(token: String) -> LockRecord {
    let now = unix_now();
    LockRecord {
        host: local_hostname(),
        pid: std::process::id(),
        started_unix: now,
        heartbeat_unix: now,
        cip_version: env!("CARGO_PKG_VERSION").to_string(),
        token,
        pid_start: process_start_ticks(std::process::id()),
        pid_ns: local_pid_ns(),
    }
}

fn record_bytes(record: &LockRecord) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(record).expect("a lock record always serializes");
    bytes.push(b'\n');
    bytes
}

impl LockGuard {
    fn start(path: &Path, mut file: File, timing: LockTiming) -> Result<LockGuard, CacheError> {
        let token = format!("{}:{}", local_hostname(), unique_suffix());
        let record = new_record(token.clone());
        let written = file
            .write_all(&record_bytes(&record))
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = fs::remove_file(path);
            return Err(CacheError::io("write lock", path, e));
        }
        drop(file);

        let lost = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = mpsc::channel::<()>();
        let thread_path = path.to_path_buf();
        let thread_lost = Arc::clone(&lost);
        let every = timing.effective_heartbeat();
        let heartbeat = std::thread::Builder::new()
            .name("cip-lock-heartbeat".to_string())
            .spawn(move || heartbeat_loop(thread_path, record, every, stopped, thread_lost))
            .map_err(|e| CacheError::io("start heartbeat thread for lock", path, e))?;
        Ok(LockGuard {
            path: path.to_path_buf(),
            token,
            lost,
            stop: Some(stop),
            heartbeat: Some(heartbeat),
            timing,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the lock file still carries our token.
    pub(crate) fn check_owned(&self) -> Result<(), CacheError> {
        if !self.lost.load(Ordering::SeqCst) && read_token(&self.path) == Some(self.token.clone()) {
            Ok(())
        } else {
            Err(CacheError::LockLost {
                path: self.path.clone(),
                stale_after_secs: self.timing.stale_after.as_secs(),
            })
        }
    }

    fn stop_heartbeat(&mut self) {
        // Dropping the sender wakes the thread at once; joining guarantees no heartbeat rename
        // can recreate the file after we remove it.
        self.stop.take();
        if let Some(thread) = self.heartbeat.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.stop_heartbeat();
        if read_token(&self.path) == Some(self.token.clone()) {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!("could not remove lock {}: {e}", self.path.display());
            }
        }
    }
}

fn heartbeat_loop(
    path: PathBuf,
    mut record: LockRecord,
    every: Duration,
    stopped: mpsc::Receiver<()>,
    lost: Arc<AtomicBool>,
) {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!("{file_name}.hb-{}", unique_suffix()));
    loop {
        match stopped.recv_timeout(every) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if read_token(&path).as_deref() != Some(record.token.as_str()) {
            lost.store(true, Ordering::SeqCst);
            tracing::error!(
                "lock {} is no longer ours (taken over as stale); this run will not commit its entry",
                path.display()
            );
            return;
        }
        record.heartbeat_unix = unix_now();
        let refreshed =
            fs::write(&temp, record_bytes(&record)).and_then(|()| fs::rename(&temp, &path));
        if let Err(e) = refreshed {
            let _ = fs::remove_file(&temp);
            tracing::warn!("could not refresh lock {}: {e}", path.display());
        }
    }
}
