//! The demo experiment end to end, as `make demo` runs it: the labelled image set drawn by cip, the
//! whole DAG on the bundled tiny models, and the report (table, plot, grids, report.md). A second
//! run executes nothing.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cip::report::{grid, plot};
use common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A project folder with the demo experiment; the fixtures it names (`../tests/fixtures`) are the
/// repository's, through a link.
fn demo_project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("experiments")).unwrap();
    std::fs::copy(
        repo().join("experiments/demo.toml"),
        dir.path().join("experiments/demo.toml"),
    )
    .unwrap();
    std::os::unix::fs::symlink(repo().join("tests"), dir.path().join("tests")).unwrap();
    dir
}

fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (img.width(), img.height())
}

#[test]
fn demo_runs_end_to_end_and_writes_its_report() {
    let project = demo_project();
    let root = project.path();
    let data = cip(root, &["data", "demo", "--out", "experiments/data/demo"]);
    assert!(data.status.success(), "{}", stderr(&data));

    let first = cip(root, &["run", "-q", "experiments/demo.toml"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let (ran, cached, failed) = summary(&first);
    assert!(ran > 0 && cached == 0 && failed == 0, "{}", stdout(&first));

    let results = root.join("results/demo");
    let table = std::fs::read_to_string(results.join("table.md")).unwrap();
    for strategy in ["real", "classname", "cip"] {
        assert!(table.contains(&format!("| {strategy} |")), "{table}");
    }

    // One plot per test set: top-1 against guidance, 800x500.
    let plots: Vec<PathBuf> = files_like(&results, "plot-");
    assert_eq!(plots.len(), 1, "{plots:?}");
    assert_eq!(png_size(&plots[0]), (plot::PLOT_W, plot::PLOT_H));

    // One grid per generated set feeding the table (2 strategies x 2 guidance values); rows are
    // the classes of the generated manifest, columns the first samples of each.
    let grids = files_like(&results, "grid-");
    assert_eq!(grids.len(), 4, "{grids:?}");
    let manifest = cip::data::table::CsvTable::read(
        &entries(&root.join("experiments/.cip/cache"), "generate")[0].join("manifest.csv"),
    )
    .unwrap();
    let class_col = manifest.column("class").unwrap();
    let classes: BTreeSet<&str> = manifest.rows.iter().map(|r| &r[class_col]).collect();
    let per_class = manifest.rows.len() / classes.len();
    let expected = grid::grid_size(
        classes.len().min(grid::GRID_CLASSES),
        per_class.min(grid::GRID_SAMPLES),
    );
    for g in &grids {
        assert_eq!(png_size(g), expected, "{}", g.display());
    }

    // report.md links every picture it wrote.
    let report = std::fs::read_to_string(results.join("report.md")).unwrap();
    for p in plots.iter().chain(&grids) {
        let name = p.file_name().unwrap().to_string_lossy();
        assert!(
            report.contains(&format!("]({name})")),
            "{name} not linked:\n{report}"
        );
    }

    let second = cip(root, &["run", "-q", "experiments/demo.toml"]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(summary(&second), (0, ran, 0));
}

fn files_like(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    v.sort();
    v
}
