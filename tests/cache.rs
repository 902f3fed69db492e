//! Integration tests of the content-addressed store: atomic commit, resume from partials,
//! journal recovery, locks (dead holders, live holders, other processes), gc and errors.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cip::cache::{
    local_hostname, Acquired, Builder, Cache, CacheError, EntryMeta, EntryState, GcWhat, Journal,
    LockTiming, NameRecord, StaleReason, SummaryStatus,
};
use serde_json::{json, Value};

const KEY_A: &str = "aaaa0000";
const KEY_B: &str = "bbbb1111";
const KEY_C: &str = "cccc2222";
const KEY_D: &str = "dddd3333";
const KEY_E: &str = "eeee4444";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn meta(kind: &str, key: &str) -> EntryMeta {
    EntryMeta {
        kind: kind.to_string(),
        key: key.to_string(),
        node: format!("{kind}-node"),
        key_fields: json!({"seed": 7, "kind": kind}),
        started_unix: unix_now(),
        finished_unix: unix_now(),
        elapsed_secs: 0.5,
        cip_version: "test".to_string(),
        counts: BTreeMap::from([("items".to_string(), 2)]),
        extra: Value::Null,
    }
}

fn build(cache: &Cache, kind: &str, key: &str) -> Builder {
    match cache.acquire(kind, key).unwrap() {
        Acquired::Build(builder) => builder,
        Acquired::Cached(entry) => panic!("expected to build {kind}/{key}, found {entry:?}"),
    }
}

/// Runs `f` on a thread and fails the test if it does not finish in time, so a lock bug shows
/// up as a failure instead of a hung test run.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .expect("operation did not finish in time (blocked on a lock?)")
}

/// A pid that belonged to a process of this machine that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut child = Command::new("sleep").arg("0").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

fn write_lock(path: &Path, host: &str, pid: u32, heartbeat_unix: u64) {
    let record = json!({
        "host": host,
        "pid": pid,
        "started_unix": heartbeat_unix,
        "heartbeat_unix": heartbeat_unix,
        "cip_version": "0.0.0",
    });
    fs::write(path, record.to_string()).unwrap();
}

/// Sets a file's mtime into the past, as if nothing had touched it for `secs_ago` seconds.
fn age_file(path: &Path, secs_ago: u64) {
    let past = SystemTime::now() - Duration::from_secs(secs_ago);
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.set_modified(past).unwrap();
}

#[test]
fn commit_makes_the_entry_visible_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path().join("cache")).unwrap();
    let builder = build(&cache, "generate", KEY_A);
    assert!(!builder.resumed());
    assert_eq!(builder.dir(), cache.partial_dir("generate", KEY_A));
    const FILES: usize = 40;
    for i in 0..FILES {
        fs::write(
            builder.dir().join(format!("img{i}.bin")),
            vec![i as u8; 4096],
        )
        .unwrap();
    }

    assert_eq!(
        cache.state("generate", KEY_A),
        EntryState::Partial { journal_records: 0 }
    );
    assert!(cache.get("generate", KEY_A).unwrap().is_none());
    let listed = cache.list().unwrap();
    assert_eq!(listed.len(), 2, "partial + lock: {listed:?}");
    assert!(listed
        .iter()
        .all(|s| !matches!(s.status, SummaryStatus::Complete { .. })));
    assert!(listed
        .iter()
        .any(|s| matches!(s.status, SummaryStatus::Lock(ref l) if l.alive())));

    // A reader polling during the commit must see all files or no entry at all.
    let reader_cache = cache.clone();
    let reader = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut misses = 0u64;
        while Instant::now() < deadline {
            if let Some(entry) = reader_cache.get("generate", KEY_A).unwrap() {
                let present = fs::read_dir(&entry.dir).unwrap().count();
                assert_eq!(present, FILES + 1, "entry seen before it was complete");
                return misses;
            }
            misses += 1;
        }
        panic!("reader never saw the entry");
    });
    thread::sleep(Duration::from_millis(20));
    let entry = builder.commit(meta("generate", KEY_A)).unwrap();
    assert!(
        reader.join().unwrap() > 0,
        "reader started after the commit"
    );

    assert_eq!(entry.dir, cache.entry_dir("generate", KEY_A));
    assert_eq!(
        entry.meta,
        meta("generate", KEY_A).clone_with_times(&entry.meta)
    );
    assert_eq!(fs::read(entry.path("img3.bin")).unwrap(), vec![3u8; 4096]);
    assert!(!cache.partial_dir("generate", KEY_A).exists());
    assert!(!cache.lock_path("generate", KEY_A).exists());
    assert_eq!(cache.state("generate", KEY_A), EntryState::Cached);
    let got = cache.get("generate", KEY_A).unwrap().unwrap();
    assert_eq!(got, entry);
    let listed = cache.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].status,
        SummaryStatus::Complete {
            node: "generate-node".to_string()
        }
    );
    assert!(listed[0].bytes >= (FILES * 4096) as u64);
    match cache.acquire("generate", KEY_A).unwrap() {
        Acquired::Cached(again) => assert_eq!(again, entry),
        Acquired::Build(_) => panic!("a complete entry must not be rebuilt"),
    }
}

trait SameTimes {
    fn clone_with_times(self, other: &EntryMeta) -> EntryMeta;
}

impl SameTimes for EntryMeta {
    /// The fixture's times come from the clock; compare everything else.
    fn clone_with_times(mut self, other: &EntryMeta) -> EntryMeta {
        self.started_unix = other.started_unix;
        self.finished_unix = other.finished_unix;
        self
    }
}

#[test]
fn drop_without_commit_keeps_the_partial_and_its_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let builder = build(&cache, "caption", KEY_B);
    let mut journal = builder.journal("items").unwrap();
    journal
        .append_batch(&[
            json!({"item": "img-1", "caption": "a dog"}),
            json!({"item": "img-2", "caption": "a cat"}),
        ])
        .unwrap();
    drop(journal);
    drop(builder);

    assert!(!cache.lock_path("caption", KEY_B).exists(), "lock released");
    assert!(cache
        .partial_dir("caption", KEY_B)
        .join("items.journal")
        .is_file());
    assert_eq!(
        cache.state("caption", KEY_B),
        EntryState::Partial { journal_records: 2 }
    );
    assert!(cache.get("caption", KEY_B).unwrap().is_none());

    let resumed = build(&cache, "caption", KEY_B);
    assert!(resumed.resumed());
    let journal = resumed.journal("items").unwrap();
    assert_eq!(
        journal.done(),
        HashSet::from(["img-1".to_string(), "img-2".to_string()])
    );
    assert_eq!(journal.records()[1]["caption"], "a cat");
}

#[test]
fn journal_recovers_from_a_torn_last_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("items.journal");
    let mut journal = Journal::open(&path).unwrap();
    assert!(journal.is_empty());
    journal
        .append_batch(&[json!({"item": "a"}), json!({"item": "b", "n": 2})])
        .unwrap();
    let intact_len = fs::metadata(&path).unwrap().len();
    drop(journal);

    // A kill in the middle of a write leaves half a line.
    let mut file = OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(br#"{"item": "c", "n": "#).unwrap();
    drop(file);

    let mut journal = Journal::open(&path).unwrap();
    assert_eq!(journal.len(), 2);
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        intact_len,
        "tail truncated"
    );
    journal.append_batch(&[json!({"item": "d"})]).unwrap();
    drop(journal);

    let journal = Journal::open(&path).unwrap();
    let items: Vec<&str> = journal
        .records()
        .iter()
        .map(|r| r["item"].as_str().unwrap())
        .collect();
    assert_eq!(items, ["a", "b", "d"]);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 3);
    assert!(text.ends_with('\n'));
}

#[test]
fn journal_drops_an_invalid_last_line_and_zero_filled_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("j.journal");
    // A complete but invalid last line, then zeros from a filesystem that extended the file
    // before its data reached the disk.
    let mut bytes = b"{\"item\":\"x\"}\n{\"item\": tru\n".to_vec();
    bytes.extend_from_slice(&[0u8; 64]);
    fs::write(&path, &bytes).unwrap();
    let mut journal = Journal::open(&path).unwrap();
    assert_eq!(journal.done(), HashSet::from(["x".to_string()]));
    journal.append_batch(&[json!({"item": "y"})]).unwrap();
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        "{\"item\":\"x\"}\n{\"item\":\"y\"}\n"
    );
}

#[test]
fn journal_refuses_damage_followed_by_valid_records() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("j.journal");
    fs::write(&path, "{\"item\":\"x\"}\nnot json\n{\"item\":\"z\"}\n").unwrap();
    match Journal::open(&path) {
        Err(CacheError::CorruptJournal { line, .. }) => assert_eq!(line, 2),
        other => panic!("expected CorruptJournal, got {other:?}"),
    }
    // The file is left as it was for inspection.
    assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 3);
}

#[test]
fn journal_rejects_records_without_an_item_id() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("j.journal");
    let mut journal = Journal::open(&path).unwrap();
    let err = journal
        .append_batch(&[json!({"item": "ok"}), json!({"id": 3})])
        .unwrap_err();
    assert!(
        matches!(err, CacheError::InvalidJournalRecord { .. }),
        "{err}"
    );
    assert!(journal.is_empty(), "a rejected batch writes nothing");
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
}

#[test]
fn a_lock_held_by_a_dead_process_is_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    fs::create_dir_all(tmp.path().join("train")).unwrap();
    let lock = cache.lock_path("train", KEY_C);
    let pid = dead_pid();
    write_lock(&lock, &local_hostname(), pid, unix_now());

    let status = cache.lock_status("train", KEY_C).unwrap().unwrap();
    assert_eq!(status.stale, Some(StaleReason::DeadProcess));
    assert_eq!(status.holder.as_ref().unwrap().pid, pid);

    let taker = cache.clone();
    let builder = within(Duration::from_secs(10), move || {
        build(&taker, "train", KEY_C)
    });
    let status = cache.lock_status("train", KEY_C).unwrap().unwrap();
    assert!(status.alive());
    assert_eq!(status.holder.unwrap().pid, std::process::id());
    drop(builder);
    assert!(!lock.exists());
}

#[test]
fn racing_takers_of_a_stale_lock_build_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    fs::create_dir_all(tmp.path().join("generate")).unwrap();
    write_lock(
        &cache.lock_path("generate", KEY_D),
        &local_hostname(),
        dead_pid(),
        unix_now(),
    );
    const TAKERS: usize = 8;
    let barrier = Arc::new(std::sync::Barrier::new(TAKERS));
    let builds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handles: Vec<_> = (0..TAKERS)
        .map(|_| {
            let cache = cache.clone();
            let barrier = Arc::clone(&barrier);
            let builds = Arc::clone(&builds);
            thread::spawn(move || {
                barrier.wait();
                match cache.acquire("generate", KEY_D).unwrap() {
                    Acquired::Build(builder) => {
                        builds.fetch_add(1, Ordering::SeqCst);
                        thread::sleep(Duration::from_millis(100));
                        builder.commit(meta("generate", KEY_D)).unwrap();
                    }
                    Acquired::Cached(_) => {}
                }
            })
        })
        .collect();
    within(Duration::from_secs(30), move || {
        for handle in handles {
            handle.join().unwrap();
        }
    });
    assert_eq!(builds.load(Ordering::SeqCst), 1);
    assert_eq!(cache.state("generate", KEY_D), EntryState::Cached);
    // No takeover debris is left behind.
    let leftovers: Vec<_> = fs::read_dir(tmp.path().join("generate"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, [KEY_D]);
}

#[test]
fn a_lock_with_an_expired_heartbeat_is_taken_over_and_a_fresh_one_is_respected() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path())
        .unwrap()
        .with_stale_after(Duration::from_secs(30));
    fs::create_dir_all(tmp.path().join("eval")).unwrap();
    let lock = cache.lock_path("eval", KEY_D);

    // Another host's lock with a recent heartbeat: its pid cannot be checked from here, so it
    // is live.
    write_lock(&lock, "some-other-host", 1, unix_now());
    assert!(cache.try_acquire("eval", KEY_D).unwrap().is_none());
    assert!(lock.exists());

    write_lock(&lock, "some-other-host", 1, unix_now() - 3600);
    age_file(&lock, 3600);
    let status = cache.lock_status("eval", KEY_D).unwrap().unwrap();
    assert_eq!(status.stale, Some(StaleReason::HeartbeatExpired));
    match cache.try_acquire("eval", KEY_D).unwrap() {
        Some(Acquired::Build(builder)) => {
            assert_eq!(
                cache
                    .lock_status("eval", KEY_D)
                    .unwrap()
                    .unwrap()
                    .holder
                    .unwrap()
                    .host,
                local_hostname()
            );
            drop(builder);
        }
        other => panic!("expected to take over the expired lock, got {other:?}"),
    }
}

#[test]
fn the_heartbeat_keeps_a_held_lock_alive() {
    let tmp = tempfile::tempdir().unwrap();
    let timing = LockTiming {
        heartbeat_every: Duration::from_millis(50),
        stale_after: Duration::from_secs(1),
    };
    let cache = Cache::open(tmp.path()).unwrap().with_lock_timing(timing);
    let builder = build(&cache, "train", KEY_E);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2600) {
        assert!(
            cache.try_acquire("train", KEY_E).unwrap().is_none(),
            "a held lock must not look stale"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let status = cache.lock_status("train", KEY_E).unwrap().unwrap();
    let holder = status.holder.unwrap();
    assert!(
        holder.heartbeat_unix >= holder.started_unix + 2,
        "{holder:?}"
    );
    assert!(status.stale.is_none());
    drop(builder);
}

#[test]
fn a_live_holder_blocks_a_second_acquirer_which_then_gets_the_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let (locked_tx, locked_rx) = mpsc::channel();
    let committed = Arc::new(AtomicBool::new(false));

    let holder_cache = cache.clone();
    let holder_committed = Arc::clone(&committed);
    let holder = thread::spawn(move || {
        let builder = build(&holder_cache, "compose", KEY_A);
        locked_tx.send(()).unwrap();
        thread::sleep(Duration::from_millis(400));
        fs::write(builder.dir().join("prompts.csv"), "id,prompt\n1,a photo\n").unwrap();
        holder_committed.store(true, Ordering::SeqCst);
        builder.commit(meta("compose", KEY_A)).unwrap()
    });
    locked_rx.recv().unwrap();

    let waiter_cache = cache.clone();
    let acquired = within(Duration::from_secs(20), move || {
        waiter_cache.acquire("compose", KEY_A).unwrap()
    });
    assert!(
        committed.load(Ordering::SeqCst),
        "the second acquirer returned while the first still held the lock"
    );
    match acquired {
        Acquired::Cached(entry) => {
            assert_eq!(
                fs::read_to_string(entry.path("prompts.csv")).unwrap(),
                "id,prompt\n1,a photo\n"
            );
            assert_eq!(entry, holder.join().unwrap());
        }
        Acquired::Build(_) => panic!("the second acquirer must find the finished entry"),
    }
    assert!(!cache.lock_path("compose", KEY_A).exists());
}

const RACE_ENV: &str = "CIP_TEST_CACHE_RACE_ROOT";
const RACE_KEY: &str = "0123456789abcdef";

/// The child side of `two_processes_racing_for_one_key_compute_it_once`; run by that test.
#[test]
#[ignore = "child process of two_processes_racing_for_one_key_compute_it_once"]
fn race_child() {
    // Under `--include-ignored` without the race test around it, there is nothing to do.
    let Some(root) = std::env::var_os(RACE_ENV).map(PathBuf::from) else {
        return;
    };
    // Start together, so the acquires really race.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !root.join("go").exists() {
        assert!(Instant::now() < deadline, "never told to go");
        thread::sleep(Duration::from_millis(1));
    }
    let cache = Cache::open(root.join("cache")).unwrap();
    match cache.acquire("generate", RACE_KEY).unwrap() {
        Acquired::Build(builder) => {
            let mut log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(root.join("computations"))
                .unwrap();
            writeln!(log, "{}", std::process::id()).unwrap();
            thread::sleep(Duration::from_millis(300));
            fs::write(builder.dir().join("out.txt"), "computed").unwrap();
            builder.commit(meta("generate", RACE_KEY)).unwrap();
            println!("RACE:built");
        }
        Acquired::Cached(entry) => {
            assert_eq!(
                fs::read_to_string(entry.path("out.txt")).unwrap(),
                "computed"
            );
            println!("RACE:cached");
        }
    }
}

#[test]
fn two_processes_racing_for_one_key_compute_it_once() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    const RACERS: usize = 3;
    let children: Vec<_> = (0..RACERS)
        .map(|_| {
            Command::new(&exe)
                .args(["--ignored", "--exact", "race_child", "--nocapture"])
                .env(RACE_ENV, tmp.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    fs::write(tmp.path().join("go"), "").unwrap();

    let mut built = 0;
    let mut cached = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        built += stdout.matches("RACE:built").count();
        cached += stdout.matches("RACE:cached").count();
    }
    assert_eq!((built, cached), (1, RACERS - 1));
    let computations = fs::read_to_string(tmp.path().join("computations")).unwrap();
    assert_eq!(computations.lines().count(), 1, "computed more than once");
    let cache = Cache::open(tmp.path().join("cache")).unwrap();
    assert_eq!(cache.state("generate", RACE_KEY), EntryState::Cached);
}

#[test]
fn gc_keeps_listed_entries_and_removes_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    for key in [KEY_A, KEY_B] {
        let builder = build(&cache, "generate", key);
        fs::write(builder.dir().join("out.bin"), vec![1u8; 10_000]).unwrap();
        builder.commit(meta("generate", key)).unwrap();
    }
    // Interrupted partials: one referenced, one not.
    for key in [KEY_C, KEY_D] {
        let builder = build(&cache, "caption", key);
        builder
            .journal("items")
            .unwrap()
            .append_batch(&[json!({"item": "1"})])
            .unwrap();
    }
    // A stale lock on a kept entry, left by a dead process.
    write_lock(
        &cache.lock_path("generate", KEY_A),
        &local_hostname(),
        dead_pid(),
        unix_now(),
    );
    // An unreferenced partial that a live builder holds.
    let live = build(&cache, "train", KEY_E);
    // Something cip did not create.
    fs::write(tmp.path().join("generate").join("README"), "mine").unwrap();

    let keep: HashSet<(String, String)> = [("generate", KEY_A), ("caption", KEY_C)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();

    let removed_set = |report: &cip::cache::GcReport| -> HashSet<(String, String, GcWhat)> {
        report
            .removed
            .iter()
            .map(|i| (i.kind.clone(), i.key.clone(), i.what))
            .collect()
    };
    let expected: HashSet<(String, String, GcWhat)> = [
        ("generate", KEY_A, GcWhat::StaleLock),
        ("generate", KEY_B, GcWhat::Entry),
        ("caption", KEY_D, GcWhat::Partial),
    ]
    .into_iter()
    .map(|(k, v, w)| (k.to_string(), v.to_string(), w))
    .collect();

    let before = cache.list().unwrap();
    let dry = cache.gc(&keep, true).unwrap();
    assert!(dry.dry_run);
    assert_eq!(removed_set(&dry), expected);
    assert_eq!(cache.list().unwrap(), before, "a dry run changes nothing");

    let report = cache.gc(&keep, false).unwrap();
    assert_eq!(removed_set(&report), expected);
    assert_eq!(report.kept_entries, 1);
    assert!(report.bytes_freed >= 10_000);
    assert_eq!(report.skipped_locked.len(), 1);
    assert_eq!(report.skipped_locked[0].1, KEY_E);

    assert_eq!(cache.state("generate", KEY_A), EntryState::Cached);
    assert!(!cache.lock_path("generate", KEY_A).exists());
    assert_eq!(cache.state("generate", KEY_B), EntryState::Absent);
    assert_eq!(
        cache.state("caption", KEY_C),
        EntryState::Partial { journal_records: 1 }
    );
    assert_eq!(cache.state("caption", KEY_D), EntryState::Absent);
    assert_eq!(
        cache.state("train", KEY_E),
        EntryState::Partial { journal_records: 0 }
    );
    assert!(cache.lock_path("train", KEY_E).exists());
    assert!(tmp.path().join("generate").join("README").exists());
    drop(live);

    // Once released, the unreferenced partial goes too.
    let report = cache.gc(&keep, false).unwrap();
    assert_eq!(
        removed_set(&report),
        HashSet::from([("train".to_string(), KEY_E.to_string(), GcWhat::Partial)])
    );
    assert_eq!(cache.state("train", KEY_E), EntryState::Absent);
}

#[test]
fn commit_refuses_when_the_lock_was_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let builder = build(&cache, "generate", KEY_B);
    fs::write(builder.dir().join("out.bin"), "x").unwrap();
    // Another process judged us stale and now owns the lock.
    write_lock(
        &cache.lock_path("generate", KEY_B),
        "some-other-host",
        42,
        unix_now(),
    );
    let err = builder.commit(meta("generate", KEY_B)).unwrap_err();
    assert!(matches!(err, CacheError::LockLost { .. }), "{err}");
    assert!(cache.get("generate", KEY_B).unwrap().is_none());
    assert!(cache
        .partial_dir("generate", KEY_B)
        .join("out.bin")
        .exists());
    // Its lock is not ours to remove.
    assert!(cache.lock_path("generate", KEY_B).exists());
}

#[test]
fn commit_refuses_metadata_of_another_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let builder = build(&cache, "generate", KEY_A);
    let err = builder.commit(meta("generate", KEY_B)).unwrap_err();
    assert!(matches!(err, CacheError::MetaMismatch { .. }), "{err}");
    assert!(cache.get("generate", KEY_A).unwrap().is_none());
}

#[test]
fn names_remember_the_last_key_per_scope_and_node() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    assert_eq!(cache.recall("demo.toml", "generate").unwrap(), None);
    let first = NameRecord {
        kind: "generate".to_string(),
        key: KEY_A.to_string(),
        key_fields: json!({"guidance": 2.0}),
    };
    let second = NameRecord {
        key: KEY_B.to_string(),
        key_fields: json!({"guidance": 7.5}),
        ..first.clone()
    };
    cache.remember("demo.toml", "generate", &first).unwrap();
    cache.remember("other.toml", "generate", &second).unwrap();
    assert_eq!(cache.recall("demo.toml", "generate").unwrap(), Some(first));
    cache.remember("demo.toml", "generate", &second).unwrap();
    assert_eq!(
        cache.recall("demo.toml", "generate").unwrap(),
        Some(second.clone())
    );
    assert_eq!(
        cache.recall("other.toml", "generate").unwrap(),
        Some(second)
    );
    assert_eq!(cache.recall("demo.toml", "train/../x y").unwrap(), None);
    // Name records are not entries.
    assert!(cache.list().unwrap().is_empty());
}

#[test]
fn invalid_kinds_and_keys_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    for (kind, key) in [
        ("generate", "../etc"),
        ("generate", "ABCDEF"),
        ("generate", ""),
        ("names", KEY_A),
        ("../up", KEY_A),
    ] {
        let err = cache.acquire(kind, key).unwrap_err();
        assert!(matches!(err, CacheError::InvalidName { .. }), "{err}");
        assert_eq!(cache.state(kind, key), EntryState::Absent);
    }
    let builder = build(&cache, "generate", KEY_A);
    let err = builder.journal("../escape").unwrap_err();
    assert!(matches!(err, CacheError::InvalidName { .. }), "{err}");
}

/// Replaces the temporary directory in a message so snapshots are stable.
fn redact(message: &str, tmp: &Path) -> String {
    message.replace(&tmp.display().to_string(), "[TMP]")
}

#[test]
fn an_unusable_root_names_the_path_and_the_fix() {
    // A regular file where the directory should be: permission bits would not stop root.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("cache");
    fs::write(&file, "not a directory").unwrap();

    let err = Cache::open(&file).unwrap_err();
    assert!(matches!(err, CacheError::Unwritable { .. }));
    insta::assert_snapshot!(
        "unwritable_root_is_a_file",
        redact(&err.to_string(), tmp.path())
    );

    let err = Cache::open(file.join("below")).unwrap_err();
    insta::assert_snapshot!(
        "unwritable_root_below_a_file",
        redact(&err.to_string(), tmp.path())
    );
}

#[test]
fn an_empty_lock_file_is_respected_until_it_is_older_than_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path())
        .unwrap()
        .with_stale_after(Duration::from_secs(30));
    fs::create_dir_all(tmp.path().join("train")).unwrap();
    let lock = cache.lock_path("train", KEY_A);
    // A holder killed between creating the file and writing its record.
    fs::write(&lock, "").unwrap();
    assert!(cache.try_acquire("train", KEY_A).unwrap().is_none());
    age_file(&lock, 600);
    let status = cache.lock_status("train", KEY_A).unwrap().unwrap();
    assert_eq!(status.stale, Some(StaleReason::Unreadable));
    assert!(matches!(
        cache.try_acquire("train", KEY_A).unwrap(),
        Some(Acquired::Build(_))
    ));
}

#[test]
fn gc_removes_old_debris_and_damaged_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path())
        .unwrap()
        .with_stale_after(Duration::from_secs(30));
    let kind_dir = tmp.path().join("eval");
    fs::create_dir_all(&kind_dir).unwrap();
    let old = kind_dir.join(format!("{KEY_B}.lock.stale-1-2-3"));
    let young = kind_dir.join(format!("{KEY_B}.lock.hb-4-5-6"));
    fs::write(&old, "{}").unwrap();
    fs::write(&young, "{}").unwrap();
    age_file(&old, 600);
    // A damaged entry is listed as such and collected like any unreferenced entry.
    let damaged = kind_dir.join(KEY_C);
    fs::create_dir_all(&damaged).unwrap();
    fs::write(damaged.join("meta.json"), "{ not json").unwrap();
    assert!(cache
        .list()
        .unwrap()
        .iter()
        .any(|s| s.key == KEY_C && matches!(s.status, SummaryStatus::Damaged { .. })));
    let debris: Vec<_> = cache
        .list()
        .unwrap()
        .into_iter()
        .filter(|s| s.status == SummaryStatus::Debris)
        .collect();
    assert_eq!(debris.len(), 2);

    let report = cache.gc(&HashSet::new(), false).unwrap();
    let removed: Vec<_> = report
        .removed
        .iter()
        .map(|i| (i.key.as_str(), i.what))
        .collect();
    assert_eq!(removed, [(KEY_B, GcWhat::Debris), (KEY_C, GcWhat::Entry)]);
    assert!(!damaged.exists());
    assert!(!old.exists());
    assert!(young.exists());
}
