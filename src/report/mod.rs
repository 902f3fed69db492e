//! The report of an experiment, in `results/<experiment>/`:
//! - `table.csv` / `table.md`: rows are variants (their sweep values), columns the test sets of the
//!   report's eval nodes, plus an optional reference column with numbers the experiment file gives;
//! - `plot-<set>-<metric>.png`: the first metric against guidance per prompt strategy (plot.rs);
//! - `grid-<node>-<variant>.png`: samples of each generated set that feeds the table (grid.rs);
//! - `report.md` linking them.
//!
//! Variants whose report nodes resolve to the same keys are the same experiment (e.g. "real data"
//! crossed with every guidance value): they collapse into one row, with `*` for the axes that do
//! not matter to it.

mod draw;
pub mod grid;
pub mod plot;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cache::Cache;
use crate::config::Experiment;
use crate::data::table::write_csv;
use crate::plan::Plan;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0} declares no [report] table\n  help: add [report] eval = [\"<eval node>\"]")]
    NoReport(PathBuf),
    #[error("no results yet for {0}: none of the report's eval nodes has finished\n  help: run `cip run {0}` first")]
    NoResults(PathBuf),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// The first `axes` columns are sweep axes.
    pub axes: usize,
    /// (eval node, test set, metric) of each metric column, in column order after the axes.
    pub metric_columns: Vec<(String, String, String)>,
}

/// Reads the finished metrics of the report's eval nodes and lays them out.
pub fn build(exp: &Experiment, plan: &Plan, cache: &Cache) -> Result<Table, ReportError> {
    if exp.report.eval.is_empty() {
        return Err(ReportError::NoReport(exp.file.clone()));
    }
    let axes: Vec<String> = exp.axes.iter().map(|a| a.name.clone()).collect();
    // (eval node, set, metric) columns, in first-seen order.
    let mut metric_cols: Vec<(String, String, String)> = Vec::new();
    // Group variants by the keys of their report nodes.
    let mut groups: Vec<(Vec<String>, Vec<usize>)> = Vec::new();
    let mut values: BTreeMap<Vec<String>, BTreeMap<(String, String, String), f64>> =
        BTreeMap::new();
    let mut any = false;
    for (vi, _) in exp.variants.iter().enumerate() {
        let keys: Vec<String> = exp
            .report
            .eval
            .iter()
            .map(|e| plan.nodes[plan.variant_nodes[vi][e]].key.clone())
            .collect();
        match groups.iter_mut().find(|(k, _)| *k == keys) {
            Some((_, members)) => members.push(vi),
            None => groups.push((keys.clone(), vec![vi])),
        }
        if values.contains_key(&keys) {
            continue;
        }
        let mut cells = BTreeMap::new();
        for e in &exp.report.eval {
            let idx = plan.variant_nodes[vi][e];
            let node = &plan.nodes[idx];
            let Ok(Some(entry)) = cache.get(node.kind.name(), &node.key) else {
                continue;
            };
            any = true;
            let path = entry.dir.join("metrics.json");
            let text = std::fs::read_to_string(&path).map_err(|source| ReportError::Io {
                path: path.clone(),
                source,
            })?;
            let doc: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ReportError::Invalid {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            let sets = doc.as_object().ok_or_else(|| ReportError::Invalid {
                path: path.clone(),
                message: "expected an object of test set -> metrics".into(),
            })?;
            for (set, metrics) in sets {
                // The membership attack's balanced accuracy joins the table whenever the eval
                // node ran it (metrics.json nests it under `membership`).
                let attack = metrics
                    .get("membership")
                    .and_then(|m| m.get("balanced_accuracy"))
                    .and_then(|v| v.as_f64())
                    .map(|x| ("membership".to_string(), x));
                let requested = exp
                    .report
                    .metrics
                    .iter()
                    .filter(|m| m.as_str() != "membership")
                    .filter_map(|m| {
                        metrics
                            .get(m)
                            .and_then(|v| v.as_f64())
                            .map(|x| (m.clone(), x))
                    });
                for (m, x) in requested.chain(attack) {
                    let col = (e.clone(), set.clone(), m);
                    if !metric_cols.contains(&col) {
                        metric_cols.push(col.clone());
                    }
                    cells.insert(col, x);
                }
            }
        }
        values.insert(keys, cells);
    }
    if !any {
        return Err(ReportError::NoResults(exp.file.clone()));
    }
    let many_evals = exp.report.eval.len() > 1;
    let mut columns = axes.clone();
    for (e, set, m) in &metric_cols {
        columns.push(if many_evals {
            format!("{e}/{set} {m}")
        } else {
            format!("{set} {m}")
        });
    }
    let has_reference = !exp.report.reference.is_empty();
    if has_reference {
        columns.push(
            exp.report
                .reference_label
                .clone()
                .unwrap_or_else(|| "reference".into()),
        );
    }
    let mut rows = Vec::new();
    for (keys, members) in &groups {
        let mut row = Vec::new();
        for (ai, _) in axes.iter().enumerate() {
            let first = &exp.variants[members[0]].labels[ai].1;
            let same = members
                .iter()
                .all(|m| &exp.variants[*m].labels[ai].1 == first);
            row.push(if same { first.clone() } else { "*".to_string() });
        }
        for col in &metric_cols {
            row.push(
                values[keys]
                    .get(col)
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or_else(|| "—".into()),
            );
        }
        if has_reference {
            let r = members
                .iter()
                .find_map(|m| exp.report.reference.get(&exp.variants[*m].id()))
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "—".into());
            row.push(r);
        }
        rows.push(row);
    }
    Ok(Table {
        columns,
        rows,
        axes: axes.len(),
        metric_columns: metric_cols,
    })
}

/// Every file a report wrote.
#[derive(Debug, Default)]
pub struct Written {
    pub table_csv: PathBuf,
    pub table_md: PathBuf,
    pub plots: Vec<PathBuf>,
    pub grids: Vec<PathBuf>,
    pub report_md: PathBuf,
}

/// Writes the table, plots, grids and `report.md` into `dir`.
pub fn write_all(
    exp: &Experiment,
    plan: &Plan,
    cache: &Cache,
    dir: &Path,
) -> Result<Written, ReportError> {
    let table = build(exp, plan, cache)?;
    let (table_csv, table_md) = table.write(dir, &exp.name)?;
    let mut written = Written {
        table_csv,
        table_md,
        ..Default::default()
    };
    let mut md = format!("# {}\n\n", exp.name);
    md.push_str(&format!("Experiment file: `{}`\n\n", exp.file.display()));
    md.push_str("## Results\n\n");
    md.push_str(
        table
            .markdown(&exp.name)
            .split_once("\n\n")
            .map_or("", |x| x.1),
    );
    md.push_str("\n[table.csv](table.csv)\n\n");

    if let (Some(x), Some(first)) = (plot::x_axis(&table), exp.report.metrics.first()) {
        md.push_str(&format!("## {first} against {}\n\n", table.columns[x]));
        for (ci, (_, set, metric)) in table.metric_columns.iter().enumerate() {
            if metric != first {
                continue;
            }
            let col = table.axes + ci;
            let name = format!("plot-{}-{}.png", file_part(set), file_part(metric));
            let path = dir.join(&name);
            let title = format!("{}: {} on {set}", exp.name, metric);
            plot::write_plot(&table, x, col, &title, &path)?;
            md.push_str(&format!("![{title}]({name})\n\n"));
            written.plots.push(path);
        }
    }

    let grids = generated_sets(exp, plan, cache);
    if !grids.is_empty() {
        md.push_str("## Samples\n\nRows are classes, columns the first images of each class, with their prompts.\n\n");
    }
    for (node, variant, entry_dir) in grids {
        let name = format!("grid-{}-{}.png", file_part(&node), file_part(&variant));
        let path = dir.join(&name);
        let title = format!("{} · {node} · {variant}", exp.name);
        grid::write_grid(&entry_dir, &title, &path)?;
        md.push_str(&format!("### {node}, {variant}\n\n![{title}]({name})\n\n"));
        written.grids.push(path);
    }
    let report_md = dir.join("report.md");
    std::fs::write(&report_md, md).map_err(|source| ReportError::Io {
        path: report_md.clone(),
        source,
    })?;
    written.report_md = report_md;
    Ok(written)
}

/// Finished generate entries upstream of the report's eval nodes: (node name, variant id, entry
/// dir), one per entry, named after the first variant that uses it.
fn generated_sets(exp: &Experiment, plan: &Plan, cache: &Cache) -> Vec<(String, String, PathBuf)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (vi, variant) in exp.variants.iter().enumerate() {
        for e in &exp.report.eval {
            let Some(&ei) = plan.variant_nodes[vi].get(e) else {
                continue;
            };
            for ai in plan.ancestors(ei) {
                let node = &plan.nodes[ai];
                if node.kind.name() != "generate" || !seen.insert(ai) {
                    continue;
                }
                if let Ok(Some(entry)) = cache.get(node.kind.name(), &node.key) {
                    let name = node
                        .uses
                        .iter()
                        .find(|(v, _)| *v == vi)
                        .map(|(_, n)| n.clone())
                        .unwrap_or_else(|| node.name().to_string());
                    out.push((name, variant.id(), entry.dir.clone()));
                }
            }
        }
    }
    out
}

/// A label as a file-name part: `prompt=cip,guidance=1.5` -> `prompt-cip_guidance-1.5`.
fn file_part(label: &str) -> String {
    label
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => c,
            '=' => '-',
            _ => '_',
        })
        .collect()
}

impl Table {
    pub fn markdown(&self, title: &str) -> String {
        let mut s = format!("# {title}\n\n");
        s.push_str(&format!("| {} |\n", self.columns.join(" | ")));
        s.push_str(&format!(
            "|{}\n",
            self.columns.iter().map(|_| "---|").collect::<String>()
        ));
        for r in &self.rows {
            s.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        s
    }

    /// Writes `table.csv` and `table.md` into `dir`, returning their paths.
    pub fn write(&self, dir: &Path, title: &str) -> Result<(PathBuf, PathBuf), ReportError> {
        std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let csv_path = dir.join("table.csv");
        let cols: Vec<&str> = self.columns.iter().map(String::as_str).collect();
        write_csv(&csv_path, &cols, &self.rows).map_err(|e| ReportError::Invalid {
            path: csv_path.clone(),
            message: e.to_string(),
        })?;
        let md_path = dir.join("table.md");
        std::fs::write(&md_path, self.markdown(title)).map_err(|source| ReportError::Io {
            path: md_path.clone(),
            source,
        })?;
        Ok((csv_path, md_path))
    }
}
