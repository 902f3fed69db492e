//! The `cip` command line: raw arguments -> resolved settings -> library calls. No logic lives here
//! beyond choosing paths and printing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use cip::cache::Cache;
use cip::config::Experiment;
use cip::exec::{self, RunOptions};
use cip::nodes::RunSettings;
use cip::plan::{Plan, Status};

#[derive(Parser)]
#[command(
    name = "cip",
    version,
    about = "Declarative experiment orchestrator for training-data synthesis"
)]
struct Cli {
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct CacheArg {
    /// Cache root [default: $CIP_CACHE, else .cip/cache beside the experiment file].
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment: every node not already cached, then the result table.
    Run {
        file: PathBuf,
        /// Run only this node (and what it needs).
        #[arg(long, value_name = "NODE")]
        only: Option<String>,
        /// Run only this variant (its id as `cip plan` prints it, or its index).
        #[arg(long, value_name = "K")]
        variant: Option<String>,
        #[command(flatten)]
        cache: CacheArg,
        /// Where result tables go [default: results/<experiment>].
        #[arg(long, value_name = "DIR")]
        results: Option<PathBuf>,
        /// Execution provider: cpu, cuda:N or tensorrt:N [default: the experiment's [run] provider].
        #[arg(long)]
        provider: Option<String>,
        /// Threads per node (0: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Devices for item nodes, e.g. cuda:0,cuda:1 or cpu,cpu: one worker each, pulling
        /// shards [default: the experiment's [run] devices].
        #[arg(long, value_delimiter = ',', value_name = "DEV,...")]
        devices: Option<Vec<String>>,
        /// Where nodes run: in this process, or as Slurm jobs on a shared cache.
        #[arg(long, value_enum, default_value = "local")]
        executor: Executor,
        #[command(flatten)]
        slurm: cip::exec::slurm::SlurmArgs,
    },
    /// Run one shard of one planned node against the cache (what Slurm array tasks run).
    #[command(hide = true)]
    Shard {
        file: PathBuf,
        #[arg(long, value_name = "NAME")]
        node: String,
        /// Variant id or index [default: the first].
        #[arg(long, value_name = "K")]
        variant: Option<String>,
        /// This shard's index, 0 <= I < N.
        #[arg(long, value_name = "I")]
        index: u32,
        /// Number of shards N (1 for nodes that are not item-parallel).
        #[arg(long, value_name = "N")]
        count: u32,
        #[command(flatten)]
        cache: CacheArg,
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Merge the shards of a planned node and commit its entry.
    #[command(hide = true)]
    Finalize {
        file: PathBuf,
        #[arg(long, value_name = "NAME")]
        node: String,
        #[arg(long, value_name = "K")]
        variant: Option<String>,
        #[command(flatten)]
        cache: CacheArg,
    },
    /// Show every node and variant: cached, runs or partial, and why a node reruns.
    Plan {
        file: PathBuf,
        #[command(flatten)]
        cache: CacheArg,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the cache's entries, partial entries and locks.
    Status {
        #[command(flatten)]
        cache: CacheArg,
    },
    /// Remove cache entries that none of the given experiments references.
    Gc {
        /// Experiments whose entries are kept.
        #[arg(long, required = true, num_args = 1.., value_name = "FILE")]
        keep: Vec<PathBuf>,
        #[command(flatten)]
        cache: CacheArg,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Generate one image from a prompt with a Stable Diffusion model directory.
    Generate(cip::nodes::generate::cli::GenerateArgs),
    /// Caption image files with a blip2 or vit-gpt2 model directory.
    Caption(cip::nodes::caption::cli::CaptionArgs),
    /// Top-k labels and probabilities of image files with a classifier model directory.
    Classify(cip::nodes::eval::classify::ClassifyArgs),
    /// Exported model directories.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Benchmarks (printed figures, never timed assertions).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write the result table from finished evaluations (runs nothing).
    Report {
        file: PathBuf,
        #[command(flatten)]
        cache: CacheArg,
        #[arg(long, value_name = "DIR")]
        results: Option<PathBuf>,
    },
    /// Datasets: draw the demo set, fetch ImageNette, link ImageNet subsets, check a dataset.
    Data {
        #[command(subcommand)]
        cmd: cip::data::cli::DataCommand,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Executor {
    Local,
    Slurm,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Validate a model directory against its cip-model.toml; print family, I/O and digest.
    Check {
        dir: PathBuf,
        /// Also recompute the blake3 digest of every file.
        #[arg(long)]
        deep: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// `cip plan` on a fully cached experiment over an N-item manifest.
    Plan {
        #[arg(long, default_value_t = 1_300_000)]
        items: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Work directory [default: a temporary one, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Train-step images/s of ResNet-18 (batch 32, 64px) and ResNet-50 (batch 16, 112px):
    /// cip through ONNX Runtime against PyTorch eager, same threads, one after the other.
    Train {
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Threads for both [default: every core].
        #[arg(long)]
        threads: Option<usize>,
        /// Where the exported models are kept between runs (exports take minutes).
        #[arg(long, default_value = "target/bench-train")]
        dir: PathBuf,
        /// Python with torch (the export tool's venv).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Only this arch (resnet18 or resnet50).
        #[arg(long)]
        only: Option<String>,
    },
    /// cip's SD pipeline vs diffusers on the full-size SD-1.5 architecture (random weights).
    Generate {
        /// Benchmark model cache (exported once, reused).
        #[arg(long, default_value = ".cip/bench/sd15")]
        dir: PathBuf,
        /// Time this cip model directory instead of DIR/model (e.g. an optimised export).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 4)]
        steps: usize,
        #[arg(long, default_value_t = 7.5)]
        guidance: f32,
        /// Image side in pixels.
        #[arg(long, default_value_t = 128)]
        size: usize,
        #[command(flatten)]
        common: BenchArgs,
    },
    /// cip's BLIP-2 captioner vs transformers' generate (OPT-2.7b widths, fewer layers).
    Caption {
        /// Benchmark model cache (exported once, reused).
        #[arg(long, default_value = ".cip/bench/blip2")]
        dir: PathBuf,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// New tokens per caption (min and max, so both sides make exactly this many).
        #[arg(long, default_value_t = 16)]
        new_tokens: usize,
        #[command(flatten)]
        common: BenchArgs,
    },
}

/// Options every model benchmark shares.
#[derive(clap::Args)]
struct BenchArgs {
    /// Threads for both sides [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Python with the reference stack.
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// The export tool.
    #[arg(long, default_value = "models/export.py")]
    export_tool: PathBuf,
    /// Write ONNX Runtime's operator profiles with this file prefix.
    #[arg(long, value_name = "PREFIX")]
    profile: Option<PathBuf>,
    /// Time cip alone (no reference run, no ratio), e.g. with --profile.
    #[arg(long)]
    cip_only: bool,
}

impl BenchArgs {
    fn python(&self) -> cip::bench::PythonTool {
        cip::bench::PythonTool {
            python: self.python.clone(),
            export_script: self.export_tool.clone(),
        }
    }

    fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            // Library errors carry their cause in their own message: print the outermost only.
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CIP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        // Slurm job logs and CI are files: no colour codes in them.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn cache_root(arg: &CacheArg, experiment: Option<&Path>) -> PathBuf {
    if let Some(c) = &arg.cache {
        return c.clone();
    }
    if let Some(c) = std::env::var_os("CIP_CACHE") {
        return PathBuf::from(c);
    }
    let dir = experiment
        .and_then(|f| f.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    dir.join(".cip").join("cache")
}

fn load(file: &Path) -> Result<Experiment> {
    Ok(Experiment::load(file)?)
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run {
            file,
            only,
            variant,
            cache,
            results,
            provider,
            threads,
            devices,
            executor,
            slurm,
        } => {
            let exp = load(&file)?;
            let plan = Plan::build(&exp)?;
            let cache = Cache::open(cache_root(&cache, Some(&file)))?;
            let opts = RunOptions { only, variant };
            let engine_cache = Some(cache.root().join(".tensorrt"));
            let selected = exec::local::select(&exp, &plan, &opts)?;
            let settings = RunSettings {
                provider: provider.unwrap_or_else(|| exp.run.provider.clone()),
                threads: threads.unwrap_or(exp.run.threads),
                devices: devices.unwrap_or_else(|| exp.run.devices.clone()),
                show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                engine_cache,
            };
            let report = match executor {
                Executor::Local => exec::run_local(&exp, &plan, &cache, &selected, &settings),
                Executor::Slurm => {
                    let driver = exec::slurm::Driver::new(&slurm, &file, &cache, &settings)?;
                    if slurm.dry_run {
                        print!("{}", driver.dry_run(&plan, &cache, &selected));
                        return Ok(ExitCode::SUCCESS);
                    }
                    driver.run(&exp, &plan, &cache, &selected)?
                }
            };
            if report.failed == 0
                && !exp.report.eval.is_empty()
                && opts.only.is_none()
                && opts.variant.is_none()
            {
                let dir = results.unwrap_or_else(|| PathBuf::from("results").join(&exp.name));
                let written = cip::report::write_all(&exp, &plan, &cache, &dir)?;
                tracing::info!("wrote {}", written.report_md.display());
            }
            for (node, error) in &report.failures {
                eprintln!("error: node `{node}` failed: {error}");
            }
            println!("{}", report.summary_line());
            Ok(if report.failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Shard {
            file,
            node,
            variant,
            index,
            count,
            cache,
            provider,
            threads,
        } => {
            let exp = load(&file)?;
            let plan = Plan::build(&exp)?;
            let cache = Cache::open(cache_root(&cache, Some(&file)))?;
            let i = exec::local::find_node(&exp, &plan, &node, variant.as_deref())?;
            let spec = cip::cache::ShardSpec::new(index, count)
                .ok_or_else(|| anyhow::anyhow!("--index {index} must be below --count {count}"))?;
            let settings = RunSettings {
                provider: provider.unwrap_or_else(|| exp.run.provider.clone()),
                threads: threads.unwrap_or(exp.run.threads),
                devices: Vec::new(),
                show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                engine_cache: Some(cache.root().join(".tensorrt")),
            };
            match exec::local::run_shard(&exp, &plan, &cache, i, spec, &settings)? {
                exec::local::ShardOutcome::Done(marker) => {
                    println!("{node} {spec}: done ({})", marker.display())
                }
                exec::local::ShardOutcome::AlreadyComplete => {
                    println!("{node}: already complete")
                }
                exec::local::ShardOutcome::Committed => println!("{node}: done"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Finalize {
            file,
            node,
            variant,
            cache,
        } => {
            let exp = load(&file)?;
            let plan = Plan::build(&exp)?;
            let cache = Cache::open(cache_root(&cache, Some(&file)))?;
            let i = exec::local::find_node(&exp, &plan, &node, variant.as_deref())?;
            let settings = RunSettings {
                provider: exp.run.provider.clone(),
                threads: exp.run.threads,
                devices: Vec::new(),
                show_progress: false,
                engine_cache: Some(cache.root().join(".tensorrt")),
            };
            let cached = exec::local::finalize(&exp, &plan, &cache, i, &settings)?;
            plan.remember(&exp, &cache, i);
            println!(
                "{node}: {}",
                if cached {
                    "already complete"
                } else {
                    "finalised"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan { file, cache, json } => {
            let exp = load(&file)?;
            // The whole DAG is shown even before data and models exist; what is missing is then
            // reported as errors after it (exit 2), each with the command that provides it.
            let (plan, problems) = Plan::build_all(&exp);
            let cache = Cache::open(cache_root(&cache, Some(&file)))?;
            let status = plan.status(&exp, &cache);
            if json {
                let doc = serde_json::json!({
                    "experiment": exp.name,
                    "file": file,
                    "variants": exp.variants.iter().map(|v| serde_json::json!({"id": v.id(), "labels": v.labels})).collect::<Vec<_>>(),
                    "nodes": status,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print!("{}", render_plan(&exp, &status));
            }
            if problems.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                for p in &problems {
                    eprintln!("error: {p}");
                }
                Ok(ExitCode::from(2))
            }
        }
        Command::Status { cache } => {
            let cache = Cache::open(cache_root(&cache, None))?;
            let entries = cache.list()?;
            println!("cache {}", cache.root().display());
            for e in &entries {
                println!("{}", render_entry(e));
            }
            println!("{} entries", entries.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc {
            keep,
            cache,
            dry_run,
        } => {
            let cache = Cache::open(cache_root(&cache, keep.first().map(PathBuf::as_path)))?;
            let mut keys = std::collections::HashSet::new();
            for file in &keep {
                let exp = load(file)?;
                let plan = Plan::build(&exp)?;
                for n in &plan.nodes {
                    keys.insert((n.kind.name().to_string(), n.key.clone()));
                }
            }
            let report = cache.gc(&keys, dry_run)?;
            let verb = if report.dry_run {
                "would remove"
            } else {
                "removed"
            };
            for item in &report.removed {
                println!(
                    "{verb} {:?} {}/{} ({})",
                    item.what,
                    item.kind,
                    &item.key[..item.key.len().min(12)],
                    human_bytes(item.bytes)
                );
            }
            for (kind, key, _) in &report.skipped_locked {
                println!(
                    "kept {kind}/{}: locked by a live process",
                    &key[..key.len().min(12)]
                );
            }
            println!(
                "{verb} {} item(s), {} · kept {} referenced entr{}",
                report.removed.len(),
                human_bytes(report.bytes_freed),
                report.kept_entries,
                if report.kept_entries == 1 { "y" } else { "ies" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            file,
            cache,
            results,
        } => {
            let exp = load(&file)?;
            let plan = Plan::build(&exp)?;
            let cache = Cache::open(cache_root(&cache, Some(&file)))?;
            let dir = results.unwrap_or_else(|| PathBuf::from("results").join(&exp.name));
            let w = cip::report::write_all(&exp, &plan, &cache, &dir)?;
            for path in [&w.table_csv, &w.table_md]
                .into_iter()
                .chain(&w.plots)
                .chain(&w.grids)
                .chain([&w.report_md])
            {
                println!("{}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(args) => {
            cip::nodes::generate::cli::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Classify(args) => {
            cip::nodes::eval::classify::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Caption(args) => {
            cip::nodes::caption::cli::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Models(ModelsCommand::Check { dir, deep }) => {
            let report = cip::runtime::check_model_dir(&dir, deep)?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Plan {
            items,
            repeats,
            dir,
        }) => {
            let work = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("cip-bench-plan-{}", std::process::id()))
            });
            let exe = std::env::current_exe()?;
            let result = cip::bench::plan(&exe, &work, items, repeats.max(1));
            let _ = std::fs::remove_dir_all(&work);
            let b = result?;
            println!(
                "cip plan, fully cached, {} items x 3 variants: median {:.3} s over {} runs (min {:.3} s); first run took {:.1} s",
                b.items,
                b.median(),
                b.runs.len(),
                b.runs.iter().cloned().fold(f64::INFINITY, f64::min),
                b.setup_secs
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Generate {
            dir,
            model,
            steps,
            guidance,
            size,
            common,
        }) => {
            let bench = cip::bench::generate::GenerateBench {
                dir,
                model,
                prompt: "a photo of a dog running on the grass in the park".into(),
                steps,
                guidance,
                size,
                seed: 0,
                threads: common.threads(),
                repeats: common.repeats.max(1),
                warmup: common.warmup,
                profile: common.profile.clone(),
                reference: !common.cip_only,
            };
            let result = cip::bench::generate::run(&bench, &common.python())?;
            println!(
                "SD-1.5 architecture (random weights), PNDM, {steps} steps, guidance {guidance}, {size}x{size}, batch 1, {} threads",
                bench.threads
            );
            println!("{result}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Caption {
            dir,
            batch,
            new_tokens,
            common,
        }) => {
            let bench = cip::bench::caption::CaptionBench {
                dir,
                batch,
                new_tokens,
                threads: common.threads(),
                repeats: common.repeats.max(1),
                warmup: common.warmup,
                profile: common.profile.clone(),
                reference: !common.cip_only,
            };
            let result = cip::bench::caption::run(&bench, &common.python())?;
            println!(
                "BLIP-2 (OPT-2.7b widths, fewer layers, random weights), batch {batch}, greedy, {new_tokens} new tokens, {} threads",
                bench.threads
            );
            println!("{result}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Train {
            steps,
            warmup,
            threads,
            dir,
            python,
            only,
        }) => {
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let repo = std::env::current_dir()?;
            let tool = cip::bench::PythonTool {
                python,
                export_script: repo.join("models/export.py"),
            };
            let mut ratios = Vec::new();
            for case in cip::bench::TRAIN_CASES {
                if only.as_deref().is_some_and(|o| o != case.0) {
                    continue;
                }
                let b = cip::bench::train(&tool, &repo, &dir, case, steps.max(1), warmup, threads)?;
                let (ours, theirs) = (b.cip_images_per_sec(), b.torch_images_per_sec());
                println!(
                    "{} batch {} at {}px, {} threads, {} steps: cip {:.1} images/s, torch {:.1} images/s, ratio {:.2}",
                    b.arch, b.batch, b.image_size, b.threads, b.cip_step_secs.len(), ours, theirs, ours / theirs
                );
                ratios.push(ours / theirs);
            }
            if ratios.is_empty() {
                anyhow::bail!("--only names neither resnet18 nor resnet50");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Data { cmd } => {
            cip::data::cli::run(cmd)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn render_plan(exp: &Experiment, status: &[cip::plan::NodeStatus]) -> String {
    let count = |s: Status| status.iter().filter(|n| n.status == s).count();
    let uses: usize = exp.variants.iter().map(|v| v.nodes.len()).sum();
    let mut out = format!(
        "{}: {} variant{}, {} nodes ({} unique): {} cached · {} to run · {} partial{}\n",
        exp.name,
        exp.variants.len(),
        if exp.variants.len() == 1 { "" } else { "s" },
        uses,
        status.len(),
        count(Status::Cached),
        count(Status::Runs),
        count(Status::Partial),
        match count(Status::Missing) {
            0 => String::new(),
            n => format!(" · {n} waiting for missing inputs"),
        }
    );
    let width = status
        .iter()
        .map(|n| n.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let kwidth = status
        .iter()
        .map(|n| n.kind.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let all = exp.variants.len();
    for n in status {
        let variants = if n.variants.len() == all && all > 1 {
            format!("all {all} variants")
        } else {
            collapse_variants(exp, &n.variants)
        };
        let extra = match (n.journal_records, n.missing.is_empty()) {
            (Some(r), _) => format!(" ({r} items journaled)"),
            (None, false) => format!(" (needs {})", n.missing.join(", ")),
            (None, true) => String::new(),
        };
        // A key standing on a placeholder is not a real key yet.
        let key = if n.missing.is_empty() {
            &n.key[..12]
        } else {
            "-"
        };
        out.push_str(&format!(
            "  {:<7}  {:<kwidth$}  {:<width$}  {:<12}  {}{}\n",
            n.status.to_string(),
            n.kind,
            n.name,
            key,
            variants,
            extra
        ));
        for c in &n.changed {
            out.push_str(&format!("           changed since last run: {c}\n"));
        }
    }
    out
}

/// `prompt=cip,guidance=*` for a node shared by every guidance value of the CiP rows: an axis
/// whose every value appears (with the other labels fixed) becomes `*`.
fn collapse_variants(exp: &Experiment, ids: &[String]) -> String {
    let mut rows: Vec<Vec<String>> = exp
        .variants
        .iter()
        .filter(|v| ids.contains(&v.id()))
        .map(|v| v.labels.iter().map(|(_, l)| l.clone()).collect())
        .collect();
    for (ai, axis) in exp.axes.iter().enumerate() {
        let mut groups: Vec<(Vec<String>, Vec<String>)> = Vec::new();
        for r in &rows {
            let mut rest = r.clone();
            let value = std::mem::take(&mut rest[ai]);
            match groups.iter_mut().find(|(k, _)| *k == rest) {
                Some((_, vals)) => vals.push(value),
                None => groups.push((rest, vec![value])),
            }
        }
        let mut next = Vec::new();
        for (rest, vals) in groups {
            let full = axis.values.iter().all(|v| vals.contains(&v.label));
            if full && axis.values.len() > 1 {
                let mut r = rest;
                r[ai] = "*".to_string();
                next.push(r);
            } else {
                for v in vals {
                    let mut r = rest.clone();
                    r[ai] = v;
                    next.push(r);
                }
            }
        }
        rows = next;
    }
    rows.iter()
        .map(|r| {
            exp.axes
                .iter()
                .zip(r)
                .map(|(a, l)| format!("{}={l}", a.name))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn render_entry(e: &cip::cache::EntrySummary) -> String {
    use cip::cache::SummaryStatus;
    let what = match &e.status {
        SummaryStatus::Complete { node } => format!("complete  {node}"),
        SummaryStatus::Partial { journal_records } => {
            format!("partial   {journal_records} items journaled")
        }
        SummaryStatus::Lock(l) => match &l.holder {
            Some(h) => format!(
                "lock      held by pid {} on {} ({}; heartbeat {}s ago)",
                h.pid,
                h.host,
                if l.alive() { "alive" } else { "stale" },
                l.heartbeat_age_secs
            ),
            None => "lock      unreadable".to_string(),
        },
        SummaryStatus::Debris => "debris".to_string(),
        SummaryStatus::Damaged { reason } => format!("damaged   {reason}"),
    };
    format!(
        "{:<10} {}  {:>9}  {:>6}  {what}",
        e.kind,
        &e.key[..e.key.len().min(12)],
        human_bytes(e.bytes),
        human_age(e.age_secs)
    )
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u < UNITS.len() - 1 {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}
