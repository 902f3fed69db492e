//! The paper's experiment files: each parses, plans its whole DAG before any data or model exists,
//! and names the command that provides every missing input.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of `experiments/` (files and class lists, no data) in a fresh project folder, so the
/// plan sees neither a local dataset nor exported models.
fn bare_project() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name();
            if p.is_dir() {
                if name == "data" {
                    continue;
                }
                copy(&p, &to.join(&name));
            } else if p.extension().is_some_and(|x| x == "toml" || x == "csv") {
                std::fs::copy(&p, to.join(&name)).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&repo().join("experiments"), &dir.path().join("experiments"));
    dir
}

const PAPER_EXPERIMENTS: &[&str] = &[
    "experiments/imagenette.toml",
    "experiments/imagenet100.toml",
    "experiments/imagenet1k.toml",
    "experiments/ablations/captioner.toml",
    "experiments/ablations/syn-caption.toml",
];

#[test]
fn imagenette_plan_shows_the_whole_dag_and_what_provides_each_missing_input() {
    let project = bare_project();
    let out = cip(project.path(), &["plan", "experiments/imagenette.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let text = stdout(&out);
    // 3 prompt strategies x 9 guidance values; one caption node serves all of them.
    assert!(text.starts_with("imagenette: 27 variants"), "{text}");
    let caption_lines: Vec<&str> = text.lines().filter(|l| l.contains(" caption ")).collect();
    assert_eq!(caption_lines.len(), 1, "{text}");
    assert!(caption_lines[0].contains("all 27 variants"), "{text}");
    insta::assert_snapshot!(
        "imagenette_plan",
        format!(
            "exit: {:?}\n--- stdout\n{text}--- stderr\n{}",
            out.status.code(),
            stderr(&out)
        )
    );
}

#[test]
fn every_paper_experiment_plans_and_only_inputs_are_missing() {
    let project = bare_project();
    for file in PAPER_EXPERIMENTS {
        let out = cip(project.path(), &["plan", file]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{file}: {err}");
        let text = stdout(&out);
        let header = text.lines().next().unwrap_or_default();
        assert!(header.contains(" variant"), "{file}: {text}");
        // Every node is listed and waits for inputs; nothing is rejected as a config error.
        let unique: usize = header
            .split(" unique")
            .next()
            .and_then(|s| s.rsplit('(').next())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("{file}: no node count in {header}"));
        let listed = text.lines().filter(|l| l.starts_with("  missing ")).count();
        assert_eq!(listed, unique, "{file}: {text}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
        assert!(!errors.is_empty(), "{file}");
        for e in &errors {
            assert!(e.contains("not found"), "{file}: unexpected error {e}");
        }
        let helps = err
            .lines()
            .filter(|l| l.trim_start().starts_with("help: "))
            .count();
        assert_eq!(
            helps,
            errors.len(),
            "{file}: every missing input needs a hint\n{err}"
        );
    }
}
