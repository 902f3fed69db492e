//! The orchestrator end to end: caching, reruns, sweeps, kill -9 and resume, concurrency,
//! failure isolation. Uses the `test-*` node kinds (feature `test-kinds`) and the real compose.
#![cfg(feature = "test-kinds")]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const EXPERIMENT: &str = r#"
[experiment]
name = "engine"

[nodes.captions]
kind = "test-items"
count = 6
tag = "a fish"
batch = 2

[nodes.prompts]
kind = "compose"
source = "captions"
template = "a photo of {class}, {caption}"

[nodes.score]
kind = "test-score"
from = "prompts"

[nodes.side]
kind = "test-items"
count = 3
tag = "independent"

[report]
eval = ["score"]
"#;

fn project(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("exp.toml"), text).unwrap();
    dir
}

#[test]
fn second_run_executes_zero_nodes() {
    let p = project(EXPERIMENT);
    let first = cip(p.path(), &["run", "exp.toml"]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(summary(&first), (4, 0, 0));
    let table = std::fs::read_to_string(p.path().join("results/engine/table.md")).unwrap();
    assert!(table.contains("val top1"), "{table}");
    let second = cip(p.path(), &["run", "exp.toml"]);
    assert_eq!(summary(&second), (0, 4, 0));
    let plan = stdout(&cip(p.path(), &["plan", "exp.toml"]));
    assert!(plan.contains("4 cached · 0 to run"), "{plan}");
}

#[test]
fn changing_one_parameter_reruns_that_node_and_its_descendants_only() {
    let p = project(EXPERIMENT);
    assert_eq!(summary(&cip(p.path(), &["run", "exp.toml"])), (4, 0, 0));
    let changed = EXPERIMENT.replace(
        "a photo of {class}, {caption}",
        "a photo of a {class}, {caption}",
    );
    std::fs::write(p.path().join("exp.toml"), changed).unwrap();

    let plan = stdout(&cip(p.path(), &["plan", "exp.toml"]));
    assert!(plan.contains("2 cached · 2 to run"), "{plan}");
    assert!(
        plan.contains(r#"params.template: "a photo of {class}, {caption}" -> "a photo of a {class}, {caption}""#),
        "plan must name the changed field:\n{plan}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&cip(p.path(), &["plan", "exp.toml", "--json"]).stdout).unwrap();
    let runs: Vec<&str> = json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["status"] == "runs")
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(runs, vec!["prompts", "score"]);

    let rerun = cip(p.path(), &["run", "exp.toml"]);
    assert_eq!(summary(&rerun), (2, 2, 0), "{}", stderr(&rerun));
}

#[test]
fn sweep_variants_share_equal_nodes() {
    let text = format!(
        "{EXPERIMENT}\n[sweep]\n\"prompts.template\" = [\"a photo of {{class}}\", \"a photo of {{class}}, {{caption}}\", \"{{class}}\"]\n"
    );
    let p = project(&text);
    let out = cip(p.path(), &["run", "exp.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // captions and side are shared by the 3 variants; prompts and score exist once per variant.
    assert_eq!(summary(&out), (2 + 3 + 3, 0, 0));
    let cache = p.path().join(".cip/cache");
    assert_eq!(entries(&cache, "test-items").len(), 2);
    assert_eq!(entries(&cache, "compose").len(), 3);
    let table = std::fs::read_to_string(p.path().join("results/engine/table.csv")).unwrap();
    assert_eq!(table.lines().count(), 4, "{table}");
}

fn journal_lines(cache: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(cache.join("test-items")) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .map(|e| {
            std::fs::read_to_string(e.path().join("items.journal"))
                .unwrap_or_default()
                .lines()
                .count()
        })
        .sum()
}

#[test]
fn kill_9_mid_node_then_rerun_is_byte_identical() {
    let slow = EXPERIMENT.replace("count = 6\n", "count = 12\nsleep_ms = 150\n");
    // Uninterrupted reference run.
    let reference = project(&slow);
    assert!(cip(reference.path(), &["run", "exp.toml"]).status.success());

    let p = project(&slow);
    let cache = p.path().join(".cip/cache");
    run_and_kill_9(p.path(), 4, || journal_lines(&cache));
    let journaled = journal_lines(&cache);
    assert!(
        journaled >= 4 && journaled < 12,
        "killed mid-node: {journaled} items journaled"
    );
    let plan = stdout(&cip(p.path(), &["plan", "exp.toml"]));
    assert!(plan.contains("partial"), "{plan}");

    let rerun = cip(p.path(), &["run", "exp.toml"]);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    let a = tree(&reference.path().join(".cip/cache/test-items"));
    let b = tree(&cache.join("test-items"));
    let outputs = |t: &Vec<(String, Vec<u8>)>| -> Vec<(String, Vec<u8>)> {
        t.iter()
            .filter(|(p, _)| p.ends_with("captions.csv"))
            .cloned()
            .collect()
    };
    assert_eq!(outputs(&a).len(), 2);
    assert_eq!(
        outputs(&a),
        outputs(&b),
        "resumed output differs from the uninterrupted run"
    );
    // The journal was resumed, not restarted: within each node's journal every item appears once.
    let journals: Vec<&Vec<u8>> = b
        .iter()
        .filter(|(p, _)| p.ends_with("items.journal"))
        .map(|(_, bytes)| bytes)
        .collect();
    assert_eq!(journals.len(), 2);
    for bytes in journals {
        let mut ids: Vec<String> = String::from_utf8_lossy(bytes)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["item"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "an item was computed twice");
    }
}

#[test]
fn two_concurrent_runs_compute_each_node_once() {
    let slow = EXPERIMENT.replace("count = 6\n", "count = 6\nsleep_ms = 100\n");
    let p = project(&slow);
    let spawn = || {
        Command::new(cip_bin())
            .args(["run", "exp.toml", "-q"])
            .current_dir(p.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(b.status.success(), "{}", stderr(&b));
    let (ra, ca, _) = summary(&a);
    let (rb, cb, _) = summary(&b);
    assert_eq!(
        ra + rb,
        4,
        "each node computed exactly once across both runs"
    );
    assert_eq!((ra + ca, rb + cb), (4, 4));
    let cache = p.path().join(".cip/cache");
    for kind in ["test-items", "compose", "test-score"] {
        for e in entries(&cache, kind) {
            let meta: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.join("meta.json")).unwrap()).unwrap();
            assert_eq!(meta["kind"], kind);
        }
    }
    // No partial directory or lock is left behind.
    let leftovers: Vec<String> = tree(&cache)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.contains(".partial") || p.ends_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_failing_node_keeps_other_work_and_its_own_journal() {
    let failing = EXPERIMENT.replace("count = 6\n", "count = 6\nfail_at = 4\n");
    let p = project(&failing);
    let out = cip(p.path(), &["run", "exp.toml"]);
    assert_eq!(out.status.code(), Some(1));
    // `side` is independent and finished; captions failed; prompts and score were skipped.
    assert_eq!(summary(&out), (1, 0, 1));
    assert!(
        stderr(&out).contains("node `captions` failed: test-items: told to fail at item 4"),
        "{}",
        stderr(&out)
    );
    let cache = p.path().join(".cip/cache");
    assert_eq!(
        journal_lines(&cache),
        4,
        "the failed node's journal keeps its finished batches"
    );
    // fail_at only changes behaviour, not results: the fixed rerun resumes the same entry.
    std::fs::write(p.path().join("exp.toml"), EXPERIMENT).unwrap();
    let rerun = cip(p.path(), &["run", "exp.toml"]);
    assert_eq!(summary(&rerun), (3, 1, 0), "{}", stderr(&rerun));
}

#[test]
fn gc_keeps_what_the_experiment_references_and_drops_the_rest() {
    let p = project(EXPERIMENT);
    assert!(cip(p.path(), &["run", "exp.toml"]).status.success());
    let changed = EXPERIMENT.replace("a photo of {class}, {caption}", "{class}: {caption}");
    std::fs::write(p.path().join("exp.toml"), changed).unwrap();
    assert!(cip(p.path(), &["run", "exp.toml"]).status.success());
    let cache = p.path().join(".cip/cache");
    assert_eq!(entries(&cache, "compose").len(), 2);

    let dry = cip(p.path(), &["gc", "--keep", "exp.toml", "--dry-run"]);
    assert!(
        stdout(&dry).contains("would remove 2 item(s)"),
        "{}",
        stdout(&dry)
    );
    assert_eq!(
        entries(&cache, "compose").len(),
        2,
        "a dry run removes nothing"
    );

    let gc = cip(p.path(), &["gc", "--keep", "exp.toml"]);
    assert!(gc.status.success(), "{}", stderr(&gc));
    assert_eq!(entries(&cache, "compose").len(), 1);
    assert_eq!(entries(&cache, "test-score").len(), 1);
    let rerun = cip(p.path(), &["run", "exp.toml"]);
    assert_eq!(
        summary(&rerun),
        (0, 4, 0),
        "everything the experiment needs survived gc"
    );
    let status = stdout(&cip(p.path(), &["status", "--cache", ".cip/cache"]));
    assert!(status.contains("4 entries"), "{status}");
}
