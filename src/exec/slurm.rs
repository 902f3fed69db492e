//! The Slurm executor: nodes run as Slurm jobs against a cache directory that every compute node
//! mounts (NFS or a parallel filesystem); this process is the driver.
//!
//! - An item node (a journaled kind: caption, generate) goes out as ONE job array
//!   (`sbatch --array=0-(N-1)%K`); task `i` runs `cip shard FILE --node NAME --index i --count N`,
//!   which journals shard `i` into the entry's partial directory and writes the shard's
//!   completion marker (`<kind>/<key>.shards/<i>-of-<N>.done`, see `cache::shard`).
//! - Any other node (compose, train, eval) goes out as a single job running `cip shard` with
//!   `--count 1`, which runs the node whole and commits its entry.
//! - The driver polls `squeue` (no accounting database needed). A task that has left the queue
//!   without its marker (seen on two polls in a row, so a marker written just before the task
//!   ended is not missed) failed: it is resubmitted alone (`sbatch --array=i`), up to
//!   `--max-retries` times; one more failure cancels this run's jobs and stops the run with the
//!   log path of the last attempt.
//! - When every marker of a node is in, the driver finalises the entry itself (merges the shard
//!   journals, writes the manifest, commits; it loads no model) and submits what became ready.
//!
//! Logs and job scripts live in the cache: `<cache>/logs/<node>-<key12>/` holds `job.sh` and one
//! `<jobid>_<task>.log` (array) or `<jobid>.log` (single job) per attempt.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::local::{finalize, RunReport};
use crate::cache::{Cache, ShardSpec};
use crate::config::Experiment;
use crate::nodes::RunSettings;
use crate::plan::{Plan, PlannedInput};

/// Options of `cip run --executor slurm`.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Slurm executor (--executor slurm)")]
pub struct SlurmArgs {
    /// Partition the jobs go to [default: the cluster's default partition].
    #[arg(long, value_name = "P")]
    pub partition: Option<String>,
    /// GPUs per task (each shard is one task).
    #[arg(long, value_name = "N")]
    pub gpus_per_task: Option<u32>,
    /// Time limit per task, in any sbatch --time format (e.g. 4:00:00).
    #[arg(long, value_name = "TIME")]
    pub time: Option<String>,
    /// At most K tasks of one array run at once (`--array=...%K`).
    #[arg(long, value_name = "K")]
    pub array_parallelism: Option<u32>,
    /// Extra sbatch option for every job, e.g. --sbatch-arg=--account=proj (repeatable).
    #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub sbatch_args: Vec<String>,
    /// Shards (array tasks) per item node.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub shards: u32,
    /// Resubmissions of a failed shard before the run stops.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub max_retries: u32,
    /// Seconds between two looks at the queue.
    #[arg(
        long,
        env = "CIP_SLURM_POLL",
        default_value_t = 5.0,
        value_name = "SECONDS"
    )]
    pub poll_interval: f64,
    /// Print the job scripts instead of submitting them.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error(
        "the slurm executor needs `{program}`, and it is not on PATH. Run cip on a login node of \
         the cluster, load the site's Slurm module (e.g. `module load slurm`) or install the \
         client tools (Debian/Ubuntu: apt-get install slurm-client); --dry-run prints the job \
         scripts without Slurm, and --executor local runs everything here"
    )]
    NotOnPath { program: &'static str },
    #[error("--shards must be at least 1")]
    NoShards,
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sbatch rejected the job of node `{node}` ({script}): {stderr}")]
    Submit {
        node: String,
        script: PathBuf,
        stderr: String,
    },
    #[error("sbatch printed no job id for node `{node}`: {stdout:?}")]
    NoJobId { node: String, stdout: String },
    #[error("squeue failed {times} times in a row, last: {stderr}")]
    Queue { times: u32, stderr: String },
    #[error(
        "node `{node}` {what} failed {failures} times (the limit is --max-retries {retries} \
         resubmissions); the run stops. Log of the last attempt: {}{tail}",
        log.display()
    )]
    ShardFailed {
        node: String,
        what: String,
        failures: u32,
        retries: u32,
        log: PathBuf,
        tail: String,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SlurmError {
    let path = path.to_path_buf();
    move |source| SlurmError::Io {
        action,
        path,
        source,
    }
}

/// Whether `program` is an executable file in a PATH directory.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Single-quotes a word for bash.
fn quote(word: impl AsRef<OsStr>) -> String {
    let text = word.as_ref().to_string_lossy();
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A job script for one node.
struct Job {
    name: String,
    /// Array tasks, or None for a single job.
    tasks: Option<u32>,
    log_dir: PathBuf,
    text: String,
}

impl Job {
    fn script_path(&self) -> PathBuf {
        self.log_dir.join("job.sh")
    }

    /// The log of one attempt (`%A_%a.log` or `%j.log`).
    fn log_path(&self, job_id: &str, task: Option<u32>) -> PathBuf {
        match task {
            Some(t) => self.log_dir.join(format!("{job_id}_{t}.log")),
            None => self.log_dir.join(format!("{job_id}.log")),
        }
    }
}

/// One task (or the single job) of a submitted node.
struct Task {
    /// Array task index; None for a single job.
    index: Option<u32>,
    job_id: String,
    failures: u32,
    /// Polls in a row on which the task was out of the queue without its marker.
    missing: u32,
    done: bool,
}

struct Submitted {
    job: Job,
    tasks: Vec<Task>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Submitted,
    Done,
    Failed,
}

/// Drives one run through Slurm.
pub struct Driver {
    args: SlurmArgs,
    exe: PathBuf,
    file: PathBuf,
    workdir: PathBuf,
    cache_root: PathBuf,
    settings: RunSettings,
}

impl Driver {
    /// Checks the options and, unless this is a dry run, that Slurm's tools are on PATH.
    pub fn new(
        args: &SlurmArgs,
        file: &Path,
        cache: &Cache,
        settings: &RunSettings,
    ) -> Result<Driver, SlurmError> {
        if args.shards == 0 {
            return Err(SlurmError::NoShards);
        }
        if !args.dry_run {
            for program in ["sbatch", "squeue", "scancel"] {
                if !on_path(program) {
                    return Err(SlurmError::NotOnPath { program });
                }
            }
        }
        let exe = std::env::current_exe().map_err(io_error("find", Path::new("cip")))?;
        let absolute = |p: &Path| std::fs::canonicalize(p).map_err(io_error("resolve", p));
        Ok(Driver {
            args: args.clone(),
            exe,
            file: absolute(file)?,
            workdir: std::env::current_dir().map_err(io_error("resolve", Path::new(".")))?,
            cache_root: absolute(cache.root())?,
            settings: settings.clone(),
        })
    }

    fn job(&self, plan: &Plan, i: usize) -> Job {
        let node = &plan.nodes[i];
        let (variant, name) = &node.uses[0];
        let tasks = node.kind.journaled().then_some(self.args.shards);
        let log_dir =
            self.cache_root
                .join("logs")
                .join(format!("{}-{}", safe(name), node.short_key()));
        let mut text = String::from("#!/bin/bash\n");
        let what = match tasks {
            Some(n) => format!("shard $SLURM_ARRAY_TASK_ID of {n}"),
            None => "whole node".to_string(),
        };
        let _ = writeln!(
            text,
            "# cip: node {name} ({} {}), {what}",
            node.kind.name(),
            node.short_key()
        );
        let mut directive = |option: String| {
            let _ = writeln!(text, "#SBATCH {option}");
        };
        directive(format!("--job-name=cip-{}", safe(name)));
        match tasks {
            Some(n) => {
                let limit = self
                    .args
                    .array_parallelism
                    .map(|k| format!("%{k}"))
                    .unwrap_or_default();
                directive(format!("--array=0-{}{limit}", n - 1));
                directive(format!("--output={}", log_dir.join("%A_%a.log").display()));
            }
            None => directive(format!("--output={}", log_dir.join("%j.log").display())),
        }
        directive("--ntasks=1".to_string());
        directive(format!("--chdir={}", self.workdir.display()));
        if let Some(p) = &self.args.partition {
            directive(format!("--partition={p}"));
        }
        if let Some(g) = self.args.gpus_per_task {
            directive(format!("--gpus-per-task={g}"));
        }
        if let Some(t) = &self.args.time {
            directive(format!("--time={t}"));
        }
        for extra in &self.args.sbatch_args {
            directive(extra.clone());
        }
        let index = match tasks {
            Some(_) => "\"$SLURM_ARRAY_TASK_ID\"".to_string(),
            None => "0".to_string(),
        };
        let _ = writeln!(
            text,
            "exec {} shard {} --node {} --variant {variant} --index {index} --count {} --cache {} \
             --provider {} --threads {}",
            quote(&self.exe),
            quote(&self.file),
            quote(name),
            tasks.unwrap_or(1),
            quote(&self.cache_root),
            quote(&self.settings.provider),
            self.settings.threads
        );
        Job {
            name: name.clone(),
            tasks,
            log_dir,
            text,
        }
    }

    /// The job scripts of every selected node that is not cached, in submission order.
    pub fn dry_run(&self, plan: &Plan, cache: &Cache, selected: &[usize]) -> String {
        let mut out = String::new();
        for &i in selected {
            let node = &plan.nodes[i];
            if cache.state(node.kind.name(), &node.key) == crate::cache::EntryState::Cached {
                continue;
            }
            let job = self.job(plan, i);
            let after: Vec<&str> = upstream(plan, i)
                .into_iter()
                .filter(|&j| selected.contains(&j))
                .map(|j| plan.nodes[j].name())
                .collect();
            let _ = writeln!(
                out,
                "# ---- sbatch --parsable {}{}",
                job.script_path().display(),
                if after.is_empty() {
                    String::new()
                } else {
                    format!("   (after {})", after.join(", "))
                }
            );
            out.push_str(&job.text);
        }
        out
    }

    /// Submits the job; `only_tasks` limits an array to those task indices (a resubmission, or
    /// a rerun where some shards already finished).
    fn submit(&self, job: &Job, only_tasks: Option<&[u32]>) -> Result<String, SlurmError> {
        let script = job.script_path();
        std::fs::create_dir_all(&job.log_dir).map_err(io_error("create", &job.log_dir))?;
        if !script.is_file() || std::fs::read_to_string(&script).ok().as_deref() != Some(&job.text)
        {
            std::fs::write(&script, &job.text).map_err(io_error("write", &script))?;
        }
        let mut command = Command::new("sbatch");
        command.arg("--parsable");
        if let Some(tasks) = only_tasks {
            let list: Vec<String> = tasks.iter().map(u32::to_string).collect();
            let limit = self
                .args
                .array_parallelism
                .map(|k| format!("%{k}"))
                .unwrap_or_default();
            command.arg(format!("--array={}{limit}", list.join(",")));
        }
        let output = command
            .arg(&script)
            .output()
            .map_err(io_error("run sbatch for", &script))?;
        if !output.status.success() {
            return Err(SlurmError::Submit {
                node: job.name.clone(),
                script,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
        let id = stdout
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SlurmError::NoJobId {
                node: job.name.clone(),
                stdout,
            });
        }
        tracing::info!(
            "submitted {} as job {id}{}",
            job.name,
            match (only_tasks, job.tasks) {
                (Some([t]), _) => format!(" (shard {t})"),
                (Some(tasks), _) => format!(" (shards {tasks:?})"),
                (None, Some(n)) => format!(" ({n} array tasks)"),
                (None, None) => String::new(),
            }
        );
        Ok(id)
    }

    /// (job id, array task) of every job of this user still in the queue.
    fn queue(&self) -> Result<HashSet<(String, Option<u32>)>, String> {
        let output = Command::new("squeue")
            .args(["--me", "--noheader", "--array", "--format=%F|%K|%T"])
            .output()
            .map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let mut fields = line.trim().split('|');
                let job = fields.next()?.to_string();
                let task = fields.next()?.parse::<u32>().ok();
                Some((job, task))
            })
            .collect())
    }

    fn cancel(&self, submitted: &BTreeMap<usize, Submitted>) {
        let ids: HashSet<&str> = submitted
            .values()
            .flat_map(|s| s.tasks.iter().filter(|t| !t.done))
            .map(|t| t.job_id.as_str())
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("scancel").args(ids).status();
        }
    }

    /// Submits ready nodes, polls, resubmits failed shards, finalises finished item nodes, until
    /// every selected node is done or blocked by a failure.
    pub fn run(
        &self,
        exp: &Experiment,
        plan: &Plan,
        cache: &Cache,
        selected: &[usize],
    ) -> Result<RunReport, SlurmError> {
        let mut report = RunReport::default();
        let mut state: HashMap<usize, State> =
            selected.iter().map(|&i| (i, State::Waiting)).collect();
        let mut submitted: BTreeMap<usize, Submitted> = BTreeMap::new();
        let mut queue_failures = 0u32;
        let poll = Duration::from_secs_f64(self.args.poll_interval.max(0.05));
        loop {
            // Submit every waiting node whose inputs are done; skip those behind a failure.
            for &i in selected {
                if state[&i] != State::Waiting {
                    continue;
                }
                let inputs: Vec<usize> = upstream(plan, i)
                    .into_iter()
                    .filter(|j| state.contains_key(j))
                    .collect();
                if inputs.iter().any(|j| state[j] == State::Failed) {
                    tracing::warn!("skipped {}: an input failed", plan.nodes[i].name());
                    report.skipped += 1;
                    state.insert(i, State::Failed);
                    continue;
                }
                if !inputs.iter().all(|j| state[j] == State::Done) {
                    continue;
                }
                let node = &plan.nodes[i];
                if cache
                    .get(node.kind.name(), &node.key)
                    .ok()
                    .flatten()
                    .is_some()
                {
                    tracing::info!("cached {} ({})", node.name(), node.kind.name());
                    report.cached += 1;
                    plan.remember(exp, cache, i);
                    state.insert(i, State::Done);
                    continue;
                }
                let job = self.job(plan, i);
                // Shards finished by an earlier, interrupted run keep their markers.
                let missing: Option<Vec<u32>> = job.tasks.map(|n| {
                    (0..n)
                        .filter(|&t| !cache.shard_done(kind_of(plan, i), &node.key, spec(t, n)))
                        .collect()
                });
                let partial_rerun = missing
                    .as_ref()
                    .is_some_and(|m| m.len() as u32 != job.tasks.unwrap_or(0));
                let job_id = if missing.as_ref().is_some_and(Vec::is_empty) {
                    None
                } else {
                    let only = missing.as_deref().filter(|_| partial_rerun);
                    match self.submit(&job, only) {
                        Ok(id) => Some(id),
                        Err(e) => {
                            self.cancel(&submitted);
                            return Err(e);
                        }
                    }
                };
                let tasks = match (&missing, job.tasks) {
                    (Some(missing), Some(n)) => {
                        (0..n).map(|t| (Some(t), !missing.contains(&t))).collect()
                    }
                    _ => vec![(None, false)],
                }
                .into_iter()
                .map(|(index, done)| Task {
                    index,
                    job_id: job_id.clone().unwrap_or_default(),
                    failures: 0,
                    missing: 0,
                    done,
                })
                .collect();
                submitted.insert(i, Submitted { job, tasks });
                state.insert(i, State::Submitted);
            }
            if !state.values().any(|s| *s == State::Submitted) {
                break;
            }
            std::thread::sleep(poll);
            let queued = match self.queue() {
                Ok(q) => {
                    queue_failures = 0;
                    q
                }
                Err(stderr) => {
                    queue_failures += 1;
                    tracing::warn!("squeue failed: {stderr}");
                    if queue_failures >= 10 {
                        self.cancel(&submitted);
                        return Err(SlurmError::Queue {
                            times: queue_failures,
                            stderr,
                        });
                    }
                    continue;
                }
            };
            let running: Vec<usize> = submitted.keys().copied().collect();
            for i in running {
                let node = &plan.nodes[i];
                let (kind, key) = (node.kind.name(), node.key.as_str());
                let mut resubmit = Vec::new();
                {
                    let sub = submitted.get_mut(&i).expect("listed above");
                    for task in sub.tasks.iter_mut().filter(|t| !t.done) {
                        if queued.contains(&(task.job_id.clone(), task.index)) {
                            task.missing = 0;
                            continue;
                        }
                        let finished = match (task.index, sub.job.tasks) {
                            (Some(t), Some(n)) => {
                                cache.shard_done(kind, key, spec(t, n))
                                    || cache.get(kind, key).ok().flatten().is_some()
                            }
                            _ => cache.get(kind, key).ok().flatten().is_some(),
                        };
                        if finished {
                            task.done = true;
                            continue;
                        }
                        task.missing += 1;
                        if task.missing < 2 {
                            continue;
                        }
                        task.missing = 0;
                        task.failures += 1;
                        let log = sub.job.log_path(&task.job_id, task.index);
                        let what = match task.index {
                            Some(t) => format!("shard {t} of {}", sub.job.tasks.unwrap_or(1)),
                            None => "job".to_string(),
                        };
                        if task.failures > self.args.max_retries {
                            let failure = SlurmError::ShardFailed {
                                node: sub.job.name.clone(),
                                what,
                                failures: task.failures,
                                retries: self.args.max_retries,
                                tail: log_tail(&log),
                                log,
                            };
                            self.cancel(&submitted);
                            return Err(failure);
                        }
                        tracing::warn!(
                            "{} {what} failed (attempt {}); log {}; resubmitting",
                            sub.job.name,
                            task.failures,
                            log.display()
                        );
                        resubmit.push(task.index);
                    }
                }
                for index in resubmit {
                    let sub = &submitted[&i];
                    let only: Vec<u32> = index.into_iter().collect();
                    let id = match self
                        .submit(&sub.job, Some(only.as_slice()).filter(|o| !o.is_empty()))
                    {
                        Ok(id) => id,
                        Err(e) => {
                            self.cancel(&submitted);
                            return Err(e);
                        }
                    };
                    let sub = submitted.get_mut(&i).expect("listed above");
                    if let Some(task) = sub.tasks.iter_mut().find(|t| t.index == index) {
                        task.job_id = id;
                    }
                }
                if submitted[&i].tasks.iter().all(|t| t.done) {
                    let sub = submitted.remove(&i).expect("listed above");
                    let label = format!("{} ({}, {})", node.name(), kind, node.short_key());
                    let outcome = match sub.job.tasks {
                        // Every shard is in: merge and commit here (no model is loaded).
                        Some(_) => finalize(exp, plan, cache, i, &self.settings).map(|_| ()),
                        None => Ok(()),
                    };
                    match outcome {
                        Ok(()) => {
                            tracing::info!("done {label}");
                            report.ran += 1;
                            plan.remember(exp, cache, i);
                            state.insert(i, State::Done);
                        }
                        Err(e) => {
                            tracing::error!("failed {label}: {e}");
                            report.failed += 1;
                            report
                                .failures
                                .push((node.name().to_string(), e.to_string()));
                            state.insert(i, State::Failed);
                        }
                    }
                }
            }
        }
        Ok(report)
    }
}

fn spec(index: u32, count: u32) -> ShardSpec {
    ShardSpec { index, count }
}

fn kind_of(plan: &Plan, i: usize) -> &'static str {
    plan.nodes[i].kind.name()
}

/// The planned nodes a node reads.
fn upstream(plan: &Plan, i: usize) -> Vec<usize> {
    let mut ups: Vec<usize> = plan.nodes[i]
        .inputs
        .values()
        .flatten()
        .filter_map(|input| match input {
            PlannedInput::Node(j) => Some(*j),
            _ => None,
        })
        .collect();
    ups.sort_unstable();
    ups.dedup();
    ups
}

/// A node name as a file name and job name.
fn safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The last lines of a log, indented, for the error message.
fn log_tail(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(5)..];
    if tail.is_empty() {
        return String::new();
    }
    format!(
        "\nlast lines of the log:\n{}",
        tail.iter()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    )
}
