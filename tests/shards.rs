//! Shards: the demo experiment's generate node split 1, 2 and 5 ways (`cip shard`, concurrent
//! processes, then `cip finalize`) and on two local devices (`cip run --devices cpu,cpu`) gives
//! the bytes of an ordinary run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{cip_bin, entries, stderr, tree};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A project with the demo experiment (fixture paths made absolute) and its drawn data set.
fn demo_project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let experiments = dir.path().join("experiments");
    std::fs::create_dir_all(&experiments).unwrap();
    let text = std::fs::read_to_string(repo().join("experiments/demo.toml"))
        .unwrap()
        .replace(
            "../tests/fixtures",
            &repo().join("tests/fixtures").display().to_string(),
        );
    std::fs::write(experiments.join("demo.toml"), text).unwrap();
    let drawn = cip_in(
        dir.path(),
        &["data", "demo", "--out", "experiments/data/demo"],
    );
    assert!(drawn.status.success(), "{}", stderr(&drawn));
    dir
}

fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(cip_bin());
    c.args(args)
        .current_dir(dir)
        .env_remove("CIP_CACHE")
        .env("NO_COLOR", "1");
    c
}

fn cip_in(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("cip runs")
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for item in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(item.file_name());
        if item.path().is_dir() {
            copy_tree(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), target).unwrap();
        }
    }
}

/// The generate entry's images and manifest (no journals, no metadata).
fn generate_outputs(cache: &Path) -> Vec<(String, Vec<u8>)> {
    let entry = entries(cache, "generate");
    assert_eq!(entry.len(), 1, "one generate entry in {}", cache.display());
    tree(&entry[0])
        .into_iter()
        .filter(|(p, _)| p.ends_with(".png") || p == "manifest.csv")
        .collect()
}

const EXP: &str = "experiments/demo.toml";
/// Variant 0 of the demo, whose `synthetic` node generates one image per training image.
const VARIANT: &str = "0";

/// Runs `count` shards of the generate node as concurrent processes, then finalises.
fn run_sharded(dir: &Path, cache: &Path, count: u32, images: usize) {
    let cache_arg = cache.display().to_string();
    let count_arg = count.to_string();
    let children: Vec<_> = (0..count)
        .map(|i| {
            let index = i.to_string();
            command(
                dir,
                &[
                    "shard",
                    EXP,
                    "--node",
                    "synthetic",
                    "--variant",
                    VARIANT,
                    "--index",
                    &index,
                    "--count",
                    &count_arg,
                    "--cache",
                    &cache_arg,
                    "--threads",
                    "1",
                    "-q",
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let shards = std::fs::read_dir(cache.join("generate"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".shards"))
        .expect("the shard directory")
        .path();
    for i in 0..count {
        assert!(
            shards.join(format!("{i}-of-{count}.done")).is_file(),
            "marker of shard {i} of {count}"
        );
    }
    let fin = cip_in(
        dir,
        &[
            "finalize",
            EXP,
            "--node",
            "synthetic",
            "--variant",
            VARIANT,
            "--cache",
            &cache_arg,
        ],
    );
    assert!(fin.status.success(), "{}", stderr(&fin));
    assert!(!shards.exists(), "finalising removes the shard directory");
    // Each shard journaled only its own items, and every image exactly once.
    let entry = &entries(cache, "generate")[0];
    let mut ids = Vec::new();
    for (path, bytes) in tree(entry) {
        if !path.ends_with(".journal") {
            continue;
        }
        let (index, of) = path
            .strip_prefix("images.shard-")
            .and_then(|p| p.strip_suffix(".journal"))
            .and_then(|p| p.split_once("-of-"))
            .unwrap_or_else(|| panic!("only shard journals, got {path}"));
        let spec = cip::cache::ShardSpec::new(index.parse().unwrap(), of.parse().unwrap()).unwrap();
        for line in String::from_utf8(bytes).unwrap().lines() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            let id = record["item"].as_str().unwrap().to_string();
            assert!(spec.owns(&id), "{id} journaled by {spec}");
            ids.push(id);
        }
    }
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "an image was generated twice");
    assert_eq!(n, images);
}

#[test]
fn generate_as_1_2_and_5_shards_and_on_two_devices_gives_identical_bytes() {
    let p = demo_project();
    let dir = p.path();
    let base: PathBuf = dir.join("base-cache");
    let base_arg = base.display().to_string();
    // Captions and prompts once; every split starts from a copy of this cache.
    let up = cip_in(
        dir,
        &[
            "run",
            EXP,
            "--only",
            "prompts",
            "--variant",
            VARIANT,
            "--cache",
            &base_arg,
            "-q",
        ],
    );
    assert!(up.status.success(), "{}", stderr(&up));

    let plain = dir.join("plain");
    copy_tree(&base, &plain);
    let run = cip_in(
        dir,
        &[
            "run",
            EXP,
            "--only",
            "synthetic",
            "--variant",
            VARIANT,
            "--cache",
            &plain.display().to_string(),
            "--threads",
            "1",
            "-q",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let reference = generate_outputs(&plain);
    let images = reference.len() - 1;
    assert!(images >= 10, "{images} images and the manifest");

    for count in [1, 2, 5] {
        let cache = dir.join(format!("shards-{count}"));
        copy_tree(&base, &cache);
        run_sharded(dir, &cache, count, images);
        assert!(
            generate_outputs(&cache) == reference,
            "{count} shards differ from the unsharded run"
        );
    }

    // Two CPU "devices": two workers with their own sessions, pulling shards from one queue.
    let devices = dir.join("devices");
    copy_tree(&base, &devices);
    let run = cip_in(
        dir,
        &[
            "run",
            EXP,
            "--only",
            "synthetic",
            "--variant",
            VARIANT,
            "--cache",
            &devices.display().to_string(),
            "--threads",
            "1",
            "--devices",
            "cpu,cpu",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("8 shards over devices cpu,cpu"),
        "{}",
        stderr(&run)
    );
    assert!(
        generate_outputs(&devices) == reference,
        "two devices differ from one"
    );
}

#[test]
fn shard_assignment_covers_every_item_once_for_any_count() {
    let ids: Vec<String> = (0..500).map(|i| format!("n0144/{i:05}_0")).collect();
    for count in [1u32, 2, 3, 5, 16] {
        let mut sizes = vec![0usize; count as usize];
        for id in &ids {
            let owners: Vec<u32> = (0..count)
                .filter(|&i| cip::cache::ShardSpec::new(i, count).unwrap().owns(id))
                .collect();
            assert_eq!(owners.len(), 1, "{id} among {count} shards");
            assert_eq!(owners[0], cip::cache::shard_of(id, count));
            sizes[owners[0] as usize] += 1;
        }
        // A hash spreads the items: no shard is empty or holds more than twice its share.
        let share = ids.len() / count as usize;
        assert!(
            sizes.iter().all(|&s| s > 0 && s <= 2 * share),
            "{count} shards: {sizes:?}"
        );
    }
    assert!(cip::cache::ShardSpec::new(3, 3).is_none());
}

#[test]
fn a_node_that_is_not_item_parallel_cannot_be_split() {
    let p = demo_project();
    let shard_prompts = |index: &str, count: &str| {
        cip_in(
            p.path(),
            &[
                "shard", EXP, "--node", "prompts", "--index", index, "--count", count,
            ],
        )
    };
    let out = shard_prompts("0", "2");
    assert_eq!(out.status.code(), Some(2));
    // The inputs are checked first: the captions have not run yet.
    insta::assert_snapshot!("shard_input_missing", stderr_error(&out));

    let up = cip_in(p.path(), &["run", EXP, "--only", "captions", "-q"]);
    assert!(up.status.success(), "{}", stderr(&up));
    let out = shard_prompts("1", "2");
    assert_eq!(out.status.code(), Some(2));
    insta::assert_snapshot!("shard_not_item_parallel", stderr_error(&out));
    let out = shard_prompts("2", "2");
    assert_eq!(out.status.code(), Some(2));
    insta::assert_snapshot!("shard_index_out_of_range", stderr_error(&out));
    // With one shard it runs whole and commits its entry.
    let whole = shard_prompts("0", "1");
    assert!(whole.status.success(), "{}", stderr(&whole));
    assert_eq!(
        entries(&p.path().join("experiments/.cip/cache"), "compose").len(),
        1
    );
}

/// The `error:` line of a failed command, with the key prefixes masked.
fn stderr_error(out: &Output) -> String {
    let text = stderr(out);
    let line = text
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in {text}"));
    // Keys depend on the fixtures' digests; the message's shape is what is pinned.
    let mut masked = String::new();
    for word in line.split(' ') {
        if !masked.is_empty() {
            masked.push(' ');
        }
        match word.split_once('/') {
            Some((kind, key))
                if key.trim_end_matches(')').len() == 12
                    && key
                        .trim_end_matches(')')
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit()) =>
            {
                masked.push_str(&format!("{kind}/<key>{}", &key[12..]))
            }
            _ => masked.push_str(word),
        }
    }
    masked
}

// ------------------------------------------------------------ the shard protocol in the cache

mod protocol {
    use std::sync::mpsc;
    use std::time::Duration;

    use cip::cache::{Acquired, Cache, CacheError, EntryMeta, ShardAcquired, ShardSpec};
    use serde_json::json;

    const KEY: &str = "abcd0123";

    fn shard(cache: &Cache, index: u32, count: u32) -> cip::cache::Builder {
        match cache
            .acquire_shard("generate", KEY, ShardSpec::new(index, count).unwrap())
            .unwrap()
        {
            ShardAcquired::Build(b) => b,
            other => panic!("expected to build the shard, got {other:?}"),
        }
    }

    fn meta() -> EntryMeta {
        EntryMeta {
            kind: "generate".into(),
            key: KEY.into(),
            node: "images".into(),
            key_fields: json!({}),
            started_unix: 0,
            finished_unix: 0,
            elapsed_secs: 0.0,
            cip_version: "test".into(),
            counts: Default::default(),
            extra: serde_json::Value::Null,
        }
    }

    #[test]
    fn shards_of_one_entry_build_at_once_and_only_the_finaliser_commits() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let (a, b) = (shard(&cache, 0, 2), shard(&cache, 1, 2));
        assert_eq!(
            a.dir(),
            b.dir(),
            "both shards journal into the partial directory"
        );
        let mut ja = a
            .journal(&ShardSpec::new(0, 2).unwrap().journal_name("images"))
            .unwrap();
        let mut jb = b
            .journal(&ShardSpec::new(1, 2).unwrap().journal_name("images"))
            .unwrap();
        ja.append_batch(&[json!({"item": "x"})]).unwrap();
        jb.append_batch(&[json!({"item": "y"}), json!({"item": "z"})])
            .unwrap();
        // The done set is the union of every journal of the base name, read without writing.
        let done = a.journal_done("images").unwrap();
        assert_eq!(done.len(), 3);
        assert!(a.journal_done("captions").unwrap().is_empty());
        let marker = a.mark_shard_done(&cache).unwrap();
        assert!(marker.ends_with("0-of-2.done"));
        assert!(cache.shard_done("generate", KEY, ShardSpec::new(0, 2).unwrap()));
        assert!(!cache.shard_done("generate", KEY, ShardSpec::new(1, 2).unwrap()));
        assert!(matches!(
            a.commit(meta()),
            Err(CacheError::ShardCommit { .. })
        ));

        // The finaliser (a builder of the whole entry) waits for the live shard `b`.
        let (sent, received) = mpsc::channel();
        let finaliser_cache = cache.clone();
        let finaliser = std::thread::spawn(move || {
            let builder = match finaliser_cache.acquire("generate", KEY).unwrap() {
                Acquired::Build(b) => b,
                Acquired::Cached(_) => panic!("not complete yet"),
            };
            sent.send(()).unwrap();
            let records = builder.journal_records("images").unwrap();
            builder.commit(meta()).unwrap();
            records.len()
        });
        assert!(
            received.recv_timeout(Duration::from_millis(500)).is_err(),
            "the finaliser went ahead while a shard was live"
        );
        drop(jb);
        drop(b);
        received
            .recv_timeout(Duration::from_secs(10))
            .expect("the finaliser proceeds once the shard is gone");
        assert_eq!(finaliser.join().unwrap(), 3);
        assert!(
            !cache.shards_dir("generate", KEY).exists(),
            "commit removes the shard directory"
        );
        // A shard that starts after the commit finds the entry complete.
        assert!(matches!(
            cache
                .acquire_shard("generate", KEY, ShardSpec::new(1, 2).unwrap())
                .unwrap(),
            ShardAcquired::Cached(_)
        ));
    }

    #[test]
    fn a_shard_backs_off_while_the_entry_lock_is_held() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let whole = match cache.acquire("generate", KEY).unwrap() {
            Acquired::Build(b) => b,
            Acquired::Cached(_) => unreachable!(),
        };
        let spec = ShardSpec::new(0, 3).unwrap();
        assert!(matches!(
            cache.acquire_shard("generate", KEY, spec).unwrap(),
            ShardAcquired::Busy(_)
        ));
        // Backing off released the shard lock: the entry builder can still commit.
        whole.commit(meta()).unwrap();
        assert!(matches!(
            cache.acquire_shard("generate", KEY, spec).unwrap(),
            ShardAcquired::Cached(_)
        ));
    }
}

/// The eval entry's result files (no journals, no metadata).
fn eval_outputs(cache: &Path) -> Vec<(String, Vec<u8>)> {
    let entry = entries(cache, "eval");
    assert_eq!(entry.len(), 1, "one eval entry in {}", cache.display());
    tree(&entry[0])
        .into_iter()
        .filter(|(p, _)| p.ends_with(".csv") || p.ends_with(".json") && p != "meta.json")
        .collect()
}

#[test]
fn eval_as_3_shards_gives_the_metrics_of_an_ordinary_run() {
    let p = demo_project();
    let dir = p.path();
    let base = dir.join("base-cache");
    let base_arg = base.display().to_string();
    let up = cip_in(
        dir,
        &[
            "run",
            EXP,
            "--only",
            "classifier",
            "--variant",
            VARIANT,
            "--cache",
            &base_arg,
            "-q",
        ],
    );
    assert!(up.status.success(), "{}", stderr(&up));

    let plain = dir.join("plain");
    copy_tree(&base, &plain);
    let plain_arg = plain.display().to_string();
    let run = cip_in(
        dir,
        &[
            "run",
            EXP,
            "--only",
            "evaluate",
            "--variant",
            VARIANT,
            "--cache",
            &plain_arg,
            "-q",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));

    let sharded = dir.join("sharded");
    copy_tree(&base, &sharded);
    let sharded_arg = sharded.display().to_string();
    let children: Vec<_> = (0..3)
        .map(|i| {
            let index = i.to_string();
            command(
                dir,
                &[
                    "shard",
                    EXP,
                    "--node",
                    "evaluate",
                    "--variant",
                    VARIANT,
                    "--index",
                    &index,
                    "--count",
                    "3",
                    "--cache",
                    &sharded_arg,
                    "--threads",
                    "1",
                    "-q",
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let fin = cip_in(
        dir,
        &[
            "finalize",
            EXP,
            "--node",
            "evaluate",
            "--variant",
            VARIANT,
            "--cache",
            &sharded_arg,
        ],
    );
    assert!(fin.status.success(), "{}", stderr(&fin));

    let expected = eval_outputs(&plain);
    let names: Vec<&str> = expected.iter().map(|(p, _)| p.as_str()).collect();
    for wanted in [
        "metrics.json",
        "per_class.csv",
        "confusion.csv",
        "membership.csv",
    ] {
        assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
    }
    assert!(eval_outputs(&sharded) == expected, "sharded eval differs");
    // The shards scored disjoint items that together cover every image once.
    let entry = &entries(&sharded, "eval")[0];
    let mut ids = Vec::new();
    for (path, bytes) in tree(entry) {
        if path.starts_with("scores.shard-") && path.ends_with(".journal") {
            for line in String::from_utf8(bytes).unwrap().lines() {
                let record: serde_json::Value = serde_json::from_str(line).unwrap();
                ids.push(record["item"].as_str().unwrap().to_string());
            }
        }
    }
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "an image was scored twice");
    assert!(
        ids.iter().any(|i| i.starts_with("member:")),
        "members scored too"
    );
}
