//! Benchmarks that are not tests: each prints a figure from one run on this machine.
//!
//! `cip bench plan`: `cip plan` on a generated experiment whose dataset split holds an N-item
//! manifest (1.3 M by default, ImageNet-1K's train size) with every node cached. The target is
//! under 2 s: planning must never cost more than a glance.
//!
//! `cip bench generate` and `cip bench caption` ([`generate`], [`caption`]): cip's model pipelines
//! against the reference Python libraries on the same model, in one run, as a speed ratio.

pub mod caption;
pub mod generate;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

/// The median of a non-empty list of timings.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The export tool's `bench` subcommand (models/cip_export/bench.py), run with the venv's Python.
#[derive(Debug, Clone)]
pub struct PythonTool {
    pub python: PathBuf,
    pub export_script: PathBuf,
}

impl PythonTool {
    /// Runs `python export.py bench ARGS...`; stderr passes through (progress), stdout is returned.
    pub fn run(&self, args: &[&str]) -> Result<String, BenchError> {
        let mut all = vec!["bench"];
        all.extend_from_slice(args);
        self.run_script(&self.export_script, &all)
    }

    /// Runs `python SCRIPT ARGS...` offline; stderr passes through, stdout is returned.
    pub fn run_script(&self, script: &Path, args: &[&str]) -> Result<String, BenchError> {
        let output = Command::new(&self.python)
            .arg(script)
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| {
                BenchError::Failed(format!(
                    "cannot run {} {}: {e} (run `make setup`, or pass --python)",
                    self.python.display(),
                    script.display()
                ))
            })?;
        if !output.status.success() {
            return Err(BenchError::Failed(format!(
                "{} {} {} failed ({}); its error is above",
                self.python.display(),
                script.display(),
                args.first().copied().unwrap_or(""),
                output.status
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

#[derive(serde::Deserialize)]
struct ReferenceTiming {
    library: String,
    version: String,
    threads: usize,
    seconds: Vec<f64>,
}

/// Runs a `*-time` bench and reads its JSON line: the timed seconds and a label naming the library.
pub(crate) fn run_reference(
    python: &PythonTool,
    args: &[&str],
) -> Result<(Vec<f64>, String), BenchError> {
    let stdout = python.run(args)?;
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| {
            BenchError::Failed(format!(
                "bench {}: no JSON result line in its output:\n{stdout}",
                args[0]
            ))
        })?;
    let timing: ReferenceTiming = serde_json::from_str(line).map_err(|e| {
        BenchError::Failed(format!("bench {}: bad result line {line:?}: {e}", args[0]))
    })?;
    let label = format!(
        "{} {} ({} threads)",
        timing.library, timing.version, timing.threads
    );
    Ok((timing.seconds, label))
}

pub struct PlanBench {
    pub items: usize,
    pub runs: Vec<f64>,
    pub setup_secs: f64,
}

impl PlanBench {
    pub fn median(&self) -> f64 {
        let mut v = self.runs.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Builds the experiment in `work`, runs it once so everything is cached, then times `cip plan`
/// (the real command, via this executable) `repeats` times.
pub fn plan(
    cip: &Path,
    work: &Path,
    items: usize,
    repeats: usize,
) -> Result<PlanBench, BenchError> {
    let split = work.join("data/train");
    std::fs::create_dir_all(&split).map_err(io(&split))?;
    let manifest = split.join("manifest.csv");
    let file = std::fs::File::create(&manifest).map_err(io(&manifest))?;
    let mut w = std::io::BufWriter::new(file);
    writeln!(w, "id,path,class").map_err(io(&manifest))?;
    for i in 0..items {
        let class = format!("n{:08}", i % 1000);
        writeln!(w, "{class}/img{i:08},{class}/img{i:08}.JPEG,{class}").map_err(io(&manifest))?;
    }
    w.flush().map_err(io(&manifest))?;
    let classes = work.join("classes.csv");
    let mut text = String::from("# generated by cip bench plan\nid,name\n");
    for c in 0..1000 {
        text.push_str(&format!("n{c:08},class {c}\n"));
    }
    std::fs::write(&classes, text).map_err(io(&classes))?;
    let exp = work.join("bench.toml");
    std::fs::write(
        &exp,
        r#"[experiment]
name = "bench-plan"

[datasets.imagenet]
root = "data"
splits = ["train"]
classes = "classes.csv"

[nodes.prompts]
kind = "compose"
source = "imagenet.train"
template = "a photo of {class}"

[sweep]
"prompts.template" = ["a photo of {class}", "an image of a {class}", "{class}"]
"#,
    )
    .map_err(io(&exp))?;
    let run = |args: &[&str]| -> Result<std::process::Output, BenchError> {
        Command::new(cip)
            .args(args)
            .current_dir(work)
            .env_remove("CIP_CACHE")
            .output()
            .map_err(|e| BenchError::Failed(format!("cannot run {}: {e}", cip.display())))
    };
    let setup = Instant::now();
    let out = run(&["run", "-q", "bench.toml"])?;
    if !out.status.success() {
        return Err(BenchError::Failed(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let setup_secs = setup.elapsed().as_secs_f64();
    let mut runs = Vec::new();
    for _ in 0..repeats {
        let t = Instant::now();
        let out = run(&["plan", "bench.toml"])?;
        let secs = t.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.contains("0 to run") {
            return Err(BenchError::Failed(format!(
                "plan did not find everything cached:\n{text}"
            )));
        }
        runs.push(secs);
    }
    Ok(PlanBench {
        items,
        runs,
        setup_secs,
    })
}

// ---- cip bench train ----

/// The issue's two settings: (arch, batch, image size).
pub const TRAIN_CASES: [(&str, usize, u32); 2] = [("resnet18", 32, 64), ("resnet50", 16, 112)];
/// Head size of the benchmarked models (ImageNet-100, the paper's middle setting).
pub const TRAIN_BENCH_CLASSES: usize = 100;

/// One setting timed through cip (the train node's `Classifier::train_step`) and torch eager.
#[derive(Debug, Clone)]
pub struct TrainBench {
    pub arch: String,
    pub batch: usize,
    pub image_size: u32,
    pub threads: usize,
    pub cip_step_secs: Vec<f64>,
    pub torch_step_secs: Vec<f64>,
}

impl TrainBench {
    fn images_per_sec(&self, steps: &[f64]) -> f64 {
        self.batch as f64 * steps.len() as f64 / steps.iter().sum::<f64>()
    }
    pub fn cip_images_per_sec(&self) -> f64 {
        self.images_per_sec(&self.cip_step_secs)
    }
    pub fn torch_images_per_sec(&self) -> f64 {
        self.images_per_sec(&self.torch_step_secs)
    }
}

/// Exports `arch` with random weights into `work/<arch>-<size>` unless a model is there already
/// (an export of ResNet-50 takes minutes), then times `steps` train steps after `warmup` in cip
/// and then in torch (one after the other, `threads` threads each).
#[allow(clippy::too_many_arguments)]
pub fn train(
    python: &PythonTool,
    repo: &Path,
    work: &Path,
    (arch, batch, image_size): (&str, usize, u32),
    steps: usize,
    warmup: usize,
    threads: usize,
) -> Result<TrainBench, BenchError> {
    use crate::models::classifier::{Classifier, StepScalars};
    use rand::{Rng, SeedableRng};

    let model = work.join(format!("{arch}-{image_size}"));
    if !model.join(crate::runtime::MANIFEST_FILE).is_file() {
        eprintln!(
            "exporting {arch} at {image_size}px into {} ...",
            model.display()
        );
        python.run_script(
            &python.export_script,
            &[
                "classifier",
                "--arch",
                arch,
                "--num-classes",
                &TRAIN_BENCH_CLASSES.to_string(),
                "--image-size",
                &image_size.to_string(),
                "--out",
                &model.display().to_string(),
            ],
        )?;
    }

    let session = crate::runtime::SessionConfig {
        intra_threads: Some(threads),
        ..Default::default()
    };
    let failed = |e: crate::models::classifier::ClassifierError| BenchError::Failed(e.to_string());
    let mut classifier = Classifier::open(&model, session).map_err(failed)?;
    let mut state = classifier.initial_state().map_err(failed)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let s = image_size as usize;
    let images = ndarray::Array4::from_shape_fn((batch, 3, s, s), |_| rng.random_range(-2.0..2.0));
    let labels: Vec<i64> = (0..batch)
        .map(|_| rng.random_range(0..TRAIN_BENCH_CLASSES as i64))
        .collect();
    let scalars = StepScalars {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 5e-4,
        nesterov: false,
        label_smoothing: 0.0,
    };
    let mut cip_step_secs = Vec::new();
    for i in 0..warmup + steps {
        let t = Instant::now();
        classifier
            .train_step(&mut state, images.view(), &labels, scalars)
            .map_err(failed)?;
        if i >= warmup {
            cip_step_secs.push(t.elapsed().as_secs_f64());
        }
    }
    drop(classifier);

    let stdout = python.run_script(
        &repo.join("benches/torch_train_step.py"),
        &[
            "--arch",
            arch,
            "--num-classes",
            &TRAIN_BENCH_CLASSES.to_string(),
            "--image-size",
            &image_size.to_string(),
            "--batch",
            &batch.to_string(),
            "--steps",
            &steps.to_string(),
            "--warmup",
            &warmup.to_string(),
            "--threads",
            &threads.to_string(),
        ],
    )?;
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .map_err(|e| BenchError::Failed(format!("torch timing printed no JSON: {e}")))?;
    let torch_step_secs = report["step_secs"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
        .unwrap_or_default();
    Ok(TrainBench {
        arch: arch.to_string(),
        batch,
        image_size,
        threads,
        cip_step_secs,
        torch_step_secs,
    })
}
