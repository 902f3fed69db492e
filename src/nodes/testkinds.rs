//! Test-only node kinds (feature `test-kinds`), to exercise the engine before and besides the
//! model nodes: a slow journaled item source and a metrics producer. Their names start with
//! `test-` so they can never be mistaken for a real kind.

use serde::{Deserialize, Serialize};

use super::{ArtifactType, InputSlot, NodeError, NodeKind, ParamError, RunContext, RunSummary};
use crate::data::table::write_csv;

pub fn kinds() -> Vec<&'static dyn NodeKind> {
    vec![&Items, &Score]
}

/// Emits `count` captions, one journaled item at a time, sleeping `sleep_ms` per item.
pub struct Items;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ItemsParams {
    count: u64,
    #[serde(default)]
    tag: String,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default = "one")]
    batch: u64,
    /// Fails (after journaling earlier batches) when this item index is reached.
    #[serde(default)]
    fail_at: Option<u64>,
}

fn one() -> u64 {
    1
}

impl NodeKind for Items {
    fn name(&self) -> &'static str {
        "test-items"
    }
    fn version(&self) -> u32 {
        1
    }
    fn inputs(&self) -> &'static [InputSlot] {
        &[]
    }
    fn output(&self) -> ArtifactType {
        ArtifactType::Captions
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["count", "tag", "sleep_ms", "batch", "fail_at"]
    }
    fn speed_only(&self) -> &'static [&'static str] {
        &["sleep_ms", "batch", "fail_at"]
    }
    fn journaled(&self) -> bool {
        true
    }
    fn resolve_params(&self, table: &toml::Table) -> Result<serde_json::Value, ParamError> {
        super::resolve_typed::<ItemsParams>(table)
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<RunSummary, NodeError> {
        let p: ItemsParams = ctx.params()?;
        let done = ctx.builder.journal_done("items")?;
        let mut progress = ctx.progress(
            p.count,
            (0..p.count).filter(|i| done.contains(&item_id(*i))).count() as u64,
        );
        ctx.for_each_part("items", |journal_name, owns| {
            let todo: Vec<u64> = (0..p.count)
                .filter(|i| owns(&item_id(*i)) && !done.contains(&item_id(*i)))
                .collect();
            if todo.is_empty() {
                return Ok(());
            }
            let mut journal = ctx.builder.journal(journal_name)?;
            for batch in todo.chunks(p.batch.max(1) as usize) {
                let mut records = Vec::new();
                for &i in batch {
                    if p.fail_at == Some(i) {
                        return Err(NodeError::Failed(format!(
                            "test-items: told to fail at item {i}"
                        )));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(p.sleep_ms));
                    records.push(
                        serde_json::json!({"item": item_id(i), "caption": format!("{} {i}", p.tag)}),
                    );
                }
                journal.append_batch(&records)?;
                progress.advance(records.len() as u64);
            }
            Ok(())
        })?;
        if ctx.is_shard_worker() {
            return Ok(RunSummary::default());
        }
        let mut rows: Vec<[String; 4]> = ctx
            .builder
            .journal_records("items")?
            .iter()
            .map(|r| {
                let id = r["item"].as_str().unwrap().to_string();
                let class = id.split('/').next().unwrap().to_string();
                let caption = r["caption"].as_str().unwrap().to_string();
                let tokens = caption.split_whitespace().count().to_string();
                [id, class, caption, tokens]
            })
            .collect();
        rows.sort();
        rows.dedup();
        write_csv(
            &ctx.out.join("captions.csv"),
            &["id", "class", "caption", "tokens"],
            &rows,
        )
        .map_err(|e| NodeError::Failed(e.to_string()))?;
        let mut s = RunSummary::default();
        s.counts.insert("items".into(), rows.len() as u64);
        Ok(s)
    }
}

fn item_id(i: u64) -> String {
    format!("c{}/item{i:05}", i % 2)
}

/// Scores a prompts/captions table: per named set, the fraction of rows whose text mentions the
/// row's class. Enough to give the report real numbers that depend on the upstream parameters.
pub struct Score;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ScoreParams {
    #[serde(default = "default_sets")]
    sets: Vec<String>,
}

fn default_sets() -> Vec<String> {
    vec!["val".into()]
}

impl NodeKind for Score {
    fn name(&self) -> &'static str {
        "test-score"
    }
    fn version(&self) -> u32 {
        1
    }
    fn inputs(&self) -> &'static [InputSlot] {
        &[InputSlot {
            name: "from",
            accepts: &[ArtifactType::Prompts, ArtifactType::Captions],
            many: false,
            required: true,
        }]
    }
    fn output(&self) -> ArtifactType {
        ArtifactType::Metrics
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["sets"]
    }
    fn resolve_params(&self, table: &toml::Table) -> Result<serde_json::Value, ParamError> {
        super::resolve_typed::<ScoreParams>(table)
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<RunSummary, NodeError> {
        let p: ScoreParams = ctx.params()?;
        let input = ctx.input("from")?.clone();
        let table = super::compose::read_source(input.ty, &input.dir)?;
        let text_col = table
            .column("prompt")
            .or_else(|| table.column("caption"))
            .ok_or_else(|| NodeError::Failed("no prompt or caption column".into()))?;
        let class_col = table.column("class").unwrap();
        let hits = table
            .rows
            .iter()
            .filter(|r| r[text_col].contains(&r[class_col]))
            .count();
        let score = 100.0 * hits as f64 / table.rows.len().max(1) as f64;
        let mut metrics = serde_json::Map::new();
        for set in &p.sets {
            metrics.insert(
                set.clone(),
                serde_json::json!({"top1": score, "rows": table.rows.len()}),
            );
        }
        let path = ctx.out.join("metrics.json");
        std::fs::write(&path, serde_json::to_string_pretty(&metrics).unwrap())
            .map_err(NodeError::io(&path))?;
        Ok(RunSummary::default())
    }
}
