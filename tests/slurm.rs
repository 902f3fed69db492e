//! The slurm executor against a real single-node Slurm cluster (tests/slurm/start-cluster.sh,
//! started by `make test`). Without a cluster the cluster tests print `SKIPPED: ...` to stderr
//! and pass; the error and dry-run tests need no cluster.
#![cfg(feature = "test-kinds")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{cip_bin, entries, stderr, stdout, summary, tree};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Why the cluster cannot be used, if it cannot.
fn cluster_unavailable() -> Option<String> {
    for tool in ["sbatch", "squeue", "sinfo"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "`{tool}` is not on PATH (run `make slurm-up` or tests/slurm/start-cluster.sh)"
            ));
        }
    }
    let states = match Command::new("sinfo").args(["-h", "-o", "%T"]).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            return Some(format!(
                "sinfo failed: {} (start it with tests/slurm/start-cluster.sh)",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return Some(format!("sinfo failed: {e}")),
    };
    let ready = states
        .lines()
        .any(|s| matches!(s.trim(), "idle" | "mixed" | "allocated" | "completing"));
    (!ready).then(|| format!("no node is up (sinfo says {:?})", states.trim()))
}

/// Skips the calling test, visibly, when there is no cluster.
macro_rules! require_cluster {
    () => {
        if let Some(why) = cluster_unavailable() {
            // Written to the real stderr: the test harness captures `eprintln!` of passing tests.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: slurm cluster not available: {why}"
            );
            return;
        }
    };
}

/// Polls the queue this often in tests (the default suits real clusters).
const POLL: &str = "0.2";

fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(cip_bin());
    c.args(args)
        .current_dir(dir)
        .env_remove("CIP_CACHE")
        .env_remove("CIP_TEST_FAIL_SHARD")
        .env("NO_COLOR", "1")
        .env("CIP_SLURM_POLL", POLL);
    c
}

fn cip_in(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("cip runs")
}

/// A project with the demo experiment (fixture paths made absolute) and its data set.
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

const EXP: &str = "experiments/demo.toml";

/// Every output file of every entry: no metadata (timestamps), journals (their split differs by
/// design) or training logs (they hold images/s).
fn outputs(cache: &Path) -> Vec<(String, Vec<u8>)> {
    let mut all = Vec::new();
    for kind in ["caption", "compose", "generate", "train", "eval"] {
        for (path, bytes) in tree(&cache.join(kind)) {
            let file = path.rsplit('/').next().unwrap_or_default();
            let skip = file == "meta.json" || file.ends_with(".journal") || file == "train_log.csv";
            if !skip && !path.contains(".shards/") {
                all.push((format!("{kind}/{path}"), bytes));
            }
        }
    }
    all
}

fn run_demo(
    dir: &Path,
    cache: &Path,
    results: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let cache = cache.display().to_string();
    let results = results.display().to_string();
    let mut args = vec!["run", EXP, "--cache", &cache, "--results", &results];
    args.extend_from_slice(extra);
    let mut c = command(dir, &args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("cip runs")
}

#[test]
fn demo_through_slurm_equals_a_local_run_and_survives_a_failed_task() {
    require_cluster!();
    let p = demo_project();
    let dir = p.path();
    let local = run_demo(
        dir,
        &dir.join("local"),
        &dir.join("results-local"),
        &[],
        &[],
    );
    assert!(local.status.success(), "{}", stderr(&local));
    let reference = outputs(&dir.join("local"));
    let table = std::fs::read(dir.join("results-local/table.csv")).unwrap();
    assert!(reference.len() > 100, "{} output files", reference.len());

    let slurm = ["--executor", "slurm", "--shards", "3"];
    let run = run_demo(
        dir,
        &dir.join("slurm"),
        &dir.join("results-slurm"),
        &slurm,
        &[],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(summary(&run), (17, 0, 0), "{}", stdout(&run));
    assert_eq!(
        std::fs::read(dir.join("results-slurm/table.csv")).unwrap(),
        table
    );
    assert!(
        outputs(&dir.join("slurm")) == reference,
        "outputs through slurm differ from the local run"
    );
    // Item nodes went out as arrays of 3 tasks, with their logs in the cache.
    let logs = dir.join("slurm/logs");
    let generate_logs: Vec<PathBuf> = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("synthetic-")
        })
        .collect();
    assert_eq!(generate_logs.len(), 4, "four generate nodes in the demo");
    for node in &generate_logs {
        let logs = std::fs::read_dir(node)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .count();
        assert_eq!(logs, 3, "{}", node.display());
    }
    // Nothing left behind: no partial entry, lock or shard directory.
    let leftovers: Vec<String> = tree(&dir.join("slurm"))
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.contains(".partial") || p.ends_with(".lock") || p.contains(".shards"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A fresh cache where shard 1 of every generate node fails once (test hook): the driver
    // resubmits those tasks and the run still gives the same bytes.
    let run = run_demo(
        dir,
        &dir.join("retry"),
        &dir.join("results-retry"),
        &slurm,
        &[("CIP_TEST_FAIL_SHARD", "synthetic:1:1")],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let resubmitted = stderr(&run)
        .lines()
        .filter(|l| {
            l.contains("synthetic shard 1 of 3 failed (attempt 1)") && l.contains("resubmitting")
        })
        .count();
    assert_eq!(resubmitted, 4, "{}", stderr(&run));
    assert_eq!(
        std::fs::read(dir.join("results-retry/table.csv")).unwrap(),
        table
    );
    assert!(
        outputs(&dir.join("retry")) == reference,
        "outputs after a resubmitted task differ"
    );
}

#[test]
fn a_shard_that_fails_three_times_stops_the_run_with_its_log() {
    require_cluster!();
    let p = demo_project();
    let dir = p.path();
    let run = run_demo(
        dir,
        &dir.join("cache"),
        &dir.join("results"),
        &["--executor", "slurm", "--shards", "2"],
        &[("CIP_TEST_FAIL_SHARD", "captions:0:99")],
    );
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    let err = stderr(&run);
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("node `captions` shard 0 of 2 failed 3 times"),
        "{line}"
    );
    let log = line
        .split("Log of the last attempt: ")
        .nth(1)
        .unwrap_or_else(|| panic!("{line}"))
        .trim();
    assert!(
        log.starts_with(&dir.join("cache/logs/captions-").display().to_string()),
        "{log}"
    );
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("failing on purpose"), "{text}");
    // The tail of that log is part of the message.
    assert!(err.contains("failure 3 of 99"), "{err}");
}

#[test]
fn a_partition_that_does_not_exist_surfaces_sbatch_error() {
    require_cluster!();
    let p = demo_project();
    let run = run_demo(
        p.path(),
        &p.path().join("cache"),
        &p.path().join("results"),
        &["--executor", "slurm", "--partition", "no-such-partition"],
        &[],
    );
    assert_eq!(run.status.code(), Some(2));
    let err = stderr(&run);
    // The first node submitted is rejected (which one is ready first is the planner's order).
    assert!(
        err.contains("error: sbatch rejected the job of node `"),
        "{err}"
    );
    assert!(
        err.contains("invalid partition specified: no-such-partition"),
        "{err}"
    );
}

const ITEMS: &str = r#"
[experiment]
name = "engine"

[nodes.captions]
kind = "test-items"
count = 12
tag = "a fish"
sleep_ms = 50

[nodes.prompts]
kind = "compose"
source = "captions"
template = "a photo of {class}, {caption}"

[nodes.score]
kind = "test-score"
from = "prompts"

[report]
eval = ["score"]
"#;

#[test]
fn two_slurm_drivers_on_one_cache_compute_each_node_once() {
    require_cluster!();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("exp.toml"), ITEMS).unwrap();
    let spawn = || {
        command(
            dir.path(),
            &["run", "exp.toml", "--executor", "slurm", "--shards", "3"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(b.status.success(), "{}", stderr(&b));
    let cache = dir.path().join(".cip/cache");
    // Items: every one journaled exactly once over all shard journals of the entry.
    let entry = &entries(&cache, "test-items")[0];
    let mut ids: Vec<String> = tree(entry)
        .into_iter()
        .filter(|(p, _)| p.ends_with(".journal"))
        .flat_map(|(_, bytes)| {
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["item"].to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!((n, ids.len()), (12, 12), "an item was computed twice");
    // Whole-node jobs: of the two drivers' jobs for a node, one computed it and the other found
    // it complete.
    for node in ["prompts", "score"] {
        let dir = std::fs::read_dir(cache.join("logs"))
            .unwrap()
            .flatten()
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{node}-"))
            })
            .unwrap()
            .path();
        let mut computed = 0;
        for log in std::fs::read_dir(&dir).unwrap().flatten() {
            let text = std::fs::read_to_string(log.path()).unwrap_or_default();
            computed += text
                .lines()
                .filter(|l| *l == format!("{node}: done"))
                .count();
        }
        assert_eq!(computed, 1, "{node} computed {computed} times");
    }
}

#[test]
fn no_sbatch_on_path_is_a_clear_error() {
    let p = tempfile::tempdir().unwrap();
    std::fs::write(p.path().join("exp.toml"), ITEMS).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let run = command(p.path(), &["run", "exp.toml", "--executor", "slurm"])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    insta::assert_snapshot!("slurm_no_sbatch", stderr(&run).trim());
}

#[test]
fn dry_run_prints_the_job_scripts() {
    let p = tempfile::tempdir().unwrap();
    std::fs::write(p.path().join("exp.toml"), ITEMS).unwrap();
    let run = cip_in(
        p.path(),
        &[
            "run",
            "exp.toml",
            "--executor",
            "slurm",
            "--dry-run",
            "--shards",
            "3",
            "--partition",
            "gpu",
            "--gpus-per-task",
            "1",
            "--time",
            "2:00:00",
            "--array-parallelism",
            "2",
            "--sbatch-arg=--account=proj",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    // Machine-specific paths become placeholders.
    let root = std::fs::canonicalize(p.path()).unwrap();
    let text = stdout(&run)
        .replace(&cip_bin().display().to_string(), "<cip>")
        .replace(&root.display().to_string(), "<project>");
    insta::assert_snapshot!("slurm_dry_run", text);
}

#[test]
fn an_array_task_cancelled_mid_run_is_resubmitted_and_resumes() {
    require_cluster!();
    // A node name of its own, so the test finds its job by name among other tests' jobs.
    let text = ITEMS
        .replace("[nodes.captions]", "[nodes.cancelme]")
        .replace("source = \"captions\"", "source = \"cancelme\"")
        .replace("sleep_ms = 50", "sleep_ms = 400");
    let reference = tempfile::tempdir().unwrap();
    std::fs::write(reference.path().join("exp.toml"), &text).unwrap();
    let local = cip_in(reference.path(), &["run", "exp.toml"]);
    assert!(local.status.success(), "{}", stderr(&local));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("exp.toml"), &text).unwrap();
    let driver = command(
        dir.path(),
        &["run", "exp.toml", "--executor", "slurm", "--shards", "3"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Wait until task 1 of the array runs and has journaled an item, then cancel it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let cancelled = loop {
        assert!(std::time::Instant::now() < deadline, "task 1 never ran");
        let queue = Command::new("squeue")
            .args(["--me", "-h", "-r", "-n", "cip-cancelme", "-o", "%F_%K|%T"])
            .output()
            .unwrap();
        let running = String::from_utf8_lossy(&queue.stdout)
            .lines()
            .find(|l| l.ends_with("_1|RUNNING"))
            .map(|l| l.split('|').next().unwrap().to_string());
        let journaled = tree(&dir.path().join(".cip/cache/test-items"))
            .iter()
            .any(|(p, b)| p.ends_with("items.shard-1-of-3.journal") && !b.is_empty());
        if let (Some(task), true) = (running, journaled) {
            let status = Command::new("scancel").arg(&task).status().unwrap();
            assert!(status.success());
            break task;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = driver.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cancelme shard 1 of 3 failed (attempt 1)"),
        "cancelled {cancelled}: {}",
        stderr(&out)
    );
    let cache = dir.path().join(".cip/cache");
    let ref_cache = reference.path().join(".cip/cache");
    for kind in ["test-items", "compose", "test-score"] {
        let main_files = |cache: &Path| -> Vec<(String, Vec<u8>)> {
            tree(&cache.join(kind))
                .into_iter()
                .filter(|(p, _)| p.ends_with(".csv") || p.ends_with("metrics.json"))
                .collect()
        };
        assert_eq!(main_files(&cache), main_files(&ref_cache), "{kind}");
    }
    // The resubmitted task resumed from the cancelled one's journal: no item twice.
    let journal = tree(&entries(&cache, "test-items")[0])
        .into_iter()
        .filter(|(p, _)| p.ends_with(".journal"))
        .flat_map(|(_, b)| {
            String::from_utf8(b)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    let mut ids = journal.clone();
    ids.sort();
    ids.dedup();
    assert_eq!((journal.len(), ids.len()), (12, 12));
}

#[test]
fn a_driver_killed_mid_run_is_resumed_by_running_it_again() {
    require_cluster!();
    let text = ITEMS
        .replace("[nodes.captions]", "[nodes.resumeme]")
        .replace("source = \"captions\"", "source = \"resumeme\"")
        .replace("sleep_ms = 50", "sleep_ms = 300");
    let reference = tempfile::tempdir().unwrap();
    std::fs::write(reference.path().join("exp.toml"), &text).unwrap();
    let local = cip_in(reference.path(), &["run", "exp.toml"]);
    assert!(local.status.success(), "{}", stderr(&local));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("exp.toml"), &text).unwrap();
    let args = ["run", "exp.toml", "--executor", "slurm", "--shards", "3"];
    let mut driver = command(dir.path(), &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill the driver (SIGKILL) once the first shard has finished; its jobs stay in Slurm.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !tree(&dir.path().join(".cip/cache/test-items"))
        .iter()
        .any(|(p, _)| p.ends_with("-of-3.done"))
    {
        assert!(std::time::Instant::now() < deadline, "no shard finished");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    driver.kill().unwrap();
    driver.wait().unwrap();

    let rerun = cip_in(dir.path(), &args);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    let cache = dir.path().join(".cip/cache");
    let ref_cache = reference.path().join(".cip/cache");
    for kind in ["test-items", "compose", "test-score"] {
        let main_files = |cache: &Path| -> Vec<(String, Vec<u8>)> {
            tree(&cache.join(kind))
                .into_iter()
                .filter(|(p, _)| p.ends_with(".csv") || p.ends_with("metrics.json"))
                .collect()
        };
        assert_eq!(main_files(&cache), main_files(&ref_cache), "{kind}");
    }
    let journal = tree(&entries(&cache, "test-items")[0])
        .into_iter()
        .filter(|(p, _)| p.ends_with(".journal"))
        .flat_map(|(_, b)| {
            String::from_utf8(b)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    assert_eq!(journal.len(), 12, "every item computed once");
}
