//! The classifier family against torch's references (tests/fixtures/reference/classifier), and
//! the `train` / `eval` nodes through the real binary.

mod common;

use std::path::{Path, PathBuf};

use cip::models::classifier::{read_tensors, Classifier, StepScalars, TrainState};
use cip::runtime::SessionConfig;
use ndarray::{ArrayD, Ix4};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> PathBuf {
    fixtures().join("reference/classifier")
}

/// The library-level tests' session: one thread, on the CPU unless `CIP_TEST_PROVIDER` names a
/// GPU (tests/gpu/cuda-check.sh runs the parity tests on `cuda:0` that way).
fn test_session() -> SessionConfig {
    let provider = match std::env::var("CIP_TEST_PROVIDER") {
        Ok(name) => name
            .parse()
            .unwrap_or_else(|e| panic!("CIP_TEST_PROVIDER={name}: {e}")),
        Err(_) => cip::runtime::Provider::Cpu,
    };
    SessionConfig {
        intra_threads: Some(1),
        ..SessionConfig::with_provider(provider)
    }
}

fn index() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(reference().join("index.json")).unwrap()).unwrap()
}

fn tensor(file: &Path, name: &str) -> ArrayD<f32> {
    let bytes = std::fs::read(file).unwrap();
    read_tensors(file, &bytes, &[name.to_string()], "")
        .unwrap()
        .remove(0)
}

fn labels(file: &Path) -> Vec<i64> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("labels").unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::I64);
    view.data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// max |a - b| / max |b|, the measure index.json's tolerances are stated in.
fn relative_error(got: &ArrayD<f32>, want: &ArrayD<f32>) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = got
        .iter()
        .zip(want.iter())
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

fn tolerance_for(tolerance: &serde_json::Value, name: &str) -> f64 {
    let group = if name.starts_with("param.") {
        "param"
    } else if name.starts_with("momentum_buf.") {
        "momentum_buf"
    } else {
        "state"
    };
    tolerance[group].as_f64().unwrap()
}

/// Every SGD case, step 2 chained from Rust's own step-1 state (not torch's), so errors compound
/// as they would in training; through both train-step graphs.
#[test]
fn train_step_matches_torch_sgd() {
    for gemm in [false, true] {
        train_step_graph_matches_torch_sgd(gemm);
    }
}

fn train_step_graph_matches_torch_sgd(gemm: bool) {
    let index = index();
    let tolerance = &index["tolerance"];
    let mut classifier = Classifier::open(&fixtures().join("resnet-tiny"), test_session()).unwrap();
    classifier.use_train_graph(gemm).unwrap();
    let names = classifier.state_names();
    let mut chained: std::collections::BTreeMap<String, TrainState> = Default::default();
    let mut worst = std::collections::BTreeMap::<&str, f64>::new();
    let cases = index["cases"].as_array().unwrap();
    let mut ran = 0;
    for case in cases.iter().filter(|c| c["kind"] == "train_step") {
        let name = case["name"].as_str().unwrap();
        let state_in = case["state_in"].as_str().unwrap();
        let mut state = if case["state_in_prefix"] == "new." {
            let from = state_in.trim_end_matches(".safetensors");
            chained
                .get(from)
                .unwrap_or_else(|| panic!("{name}: {from} must run first"))
                .clone()
        } else {
            TrainState::read(&reference().join(state_in), &names, "").unwrap()
        };
        let batch = reference().join(case["batch"].as_str().unwrap());
        let images = tensor(&batch, "images")
            .into_dimensionality::<Ix4>()
            .unwrap();
        let s = &case["scalars"];
        let f = |k: &str| s[k].as_f64().unwrap() as f32;
        let scalars = StepScalars {
            lr: f("lr"),
            momentum: f("momentum"),
            weight_decay: f("weight_decay"),
            nesterov: f("nesterov") != 0.0,
            label_smoothing: f("label_smoothing"),
        };
        let loss = classifier
            .train_step(&mut state, images.view(), &labels(&batch), scalars)
            .unwrap();
        let expected_file = reference().join(case["file"].as_str().unwrap());
        let expected = TrainState::read(&expected_file, &names, "new.").unwrap();
        for ((tensor_name, got), (_, want)) in state.tensors.iter().zip(&expected.tensors) {
            let err = relative_error(got, want);
            let tol = tolerance_for(tolerance, tensor_name);
            assert!(
                err <= tol,
                "{name}: {tensor_name} off by {err:e} (tolerance {tol:e})"
            );
            let group = tensor_name.split('.').next().unwrap();
            let w = worst.entry(match group {
                "param" => "param",
                "momentum_buf" => "momentum_buf",
                _ => "state",
            });
            let w = w.or_insert(0.0);
            *w = w.max(err);
        }
        let want_loss = tensor(&expected_file, "loss")
            .into_dimensionality::<ndarray::Ix0>()
            .unwrap()
            .into_scalar();
        let loss_err = ((loss - want_loss) / want_loss).abs() as f64;
        assert!(
            loss_err <= tolerance["loss"].as_f64().unwrap(),
            "{name}: loss {loss} vs torch {want_loss}"
        );
        let w = worst.entry("loss").or_insert(0.0);
        *w = w.max(loss_err);
        chained.insert(name.to_string(), state);
        ran += 1;
    }
    assert_eq!(ran, 8, "index.json lists 8 SGD cases");
    eprintln!("gemm {gemm}: worst relative errors: {worst:?}");
}

/// The CPU runs the GEMM form of the train step, a GPU the convolution form (cuDNN's kernels).
#[test]
fn train_graph_follows_the_provider() {
    use cip::runtime::Provider;
    let dir = fixtures().join("resnet-tiny");
    let on = |provider| {
        Classifier::open(&dir, SessionConfig::with_provider(provider))
            .unwrap()
            .train_role()
    };
    assert_eq!(on(Provider::Cpu), "train_step_gemm");
    assert_eq!(on(Provider::Cuda(0)), "train_step");
    assert_eq!(on(Provider::TensorRt(1)), "train_step");
}

/// Ten steps chained in Rust over the batch sequence index.json names, against torch's tenth.
#[test]
fn ten_chained_steps_stay_within_1e_4_of_torch() {
    let index = index();
    let tol = index["tolerance"]["ten_steps"].as_f64().unwrap();
    assert!(tol <= 1e-4);
    let case = index["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "train_steps")
        .expect("index.json has a ten-step case");
    let mut classifier = Classifier::open(&fixtures().join("resnet-tiny"), test_session()).unwrap();
    let names = classifier.state_names();
    let mut state = TrainState::read(
        &reference().join(case["state_in"].as_str().unwrap()),
        &names,
        "",
    )
    .unwrap();
    let s = &case["scalars"];
    let f = |k: &str| s[k].as_f64().unwrap() as f32;
    let scalars = StepScalars {
        lr: f("lr"),
        momentum: f("momentum"),
        weight_decay: f("weight_decay"),
        nesterov: f("nesterov") != 0.0,
        label_smoothing: f("label_smoothing"),
    };
    let batches = case["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 10);
    let expected_file = reference().join(case["file"].as_str().unwrap());
    let want_losses = tensor(&expected_file, "losses");
    for (step, batch) in batches.iter().enumerate() {
        let batch = reference().join(batch.as_str().unwrap());
        let images = tensor(&batch, "images")
            .into_dimensionality::<Ix4>()
            .unwrap();
        let loss = classifier
            .train_step(&mut state, images.view(), &labels(&batch), scalars)
            .unwrap();
        let want = want_losses[[step]];
        let err = ((loss - want) / want).abs() as f64;
        assert!(err <= tol, "step {}: loss {loss} vs torch {want}", step + 1);
    }
    let expected = TrainState::read(&expected_file, &names, "new.").unwrap();
    let mut worst = 0f64;
    for ((name, got), (_, want)) in state.tensors.iter().zip(&expected.tensors) {
        let err = relative_error(got, want);
        assert!(err <= tol, "{name} off by {err:e} after ten steps");
        worst = worst.max(err);
    }
    eprintln!("ten steps: worst relative error {worst:e}");
}

#[test]
fn forward_and_written_forward_model_match_torch_logits() {
    let index = index();
    let tol = index["tolerance"]["logits"].as_f64().unwrap();
    let mut classifier = Classifier::open(&fixtures().join("resnet-tiny"), test_session()).unwrap();
    let names = classifier.state_names();
    for case in index["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "forward")
    {
        let file = reference().join(case["file"].as_str().unwrap());
        let images = tensor(&file, "images")
            .into_dimensionality::<Ix4>()
            .unwrap();
        let want = tensor(&file, "logits");
        let weights = reference().join(case["weights"].as_str().unwrap());
        let state =
            TrainState::read(&weights, &names, case["weights_prefix"].as_str().unwrap()).unwrap();
        // Through a model directory written from the state: the path the train node takes.
        let out = tempfile::tempdir().unwrap();
        classifier.write_forward_model(&state, out.path()).unwrap();
        let mut session =
            cip::runtime::open_session(&out.path().join("model.onnx"), &test_session()).unwrap();
        let got = cip::models::classifier::forward_logits(&mut session, out.path(), images.view())
            .unwrap()
            .into_dyn();
        let err = relative_error(&got, &want);
        eprintln!("{}: written model logits error {err:e}", case["name"]);
        assert!(err <= tol, "{}: logits off by {err:e}", case["name"]);
        if case["weights_prefix"] == "" {
            let own = classifier.forward(images.view()).unwrap().into_dyn();
            let err = relative_error(&own, &want);
            assert!(err <= tol, "forward graph logits off by {err:e}");
        }
    }
}

// ---- the nodes through the real binary ----

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `cip` in a temp project, told where ONNX Runtime is (the temp dir has no .venv to find).
fn cip_ort(dir: &Path, args: &[&str]) -> std::process::Output {
    ort_command(dir, args).output().expect("cip runs")
}

fn ort_command(dir: &Path, args: &[&str]) -> Command {
    let library = cip::runtime::find_library().expect("ONNX Runtime for the tests");
    let mut command = Command::new(cip_bin());
    command
        .args(args)
        .current_dir(dir)
        .env_remove("CIP_CACHE")
        .env("NO_COLOR", "1")
        .env("ORT_DYLIB_PATH", std::path::absolute(library).unwrap());
    command
}

/// A class-coloured ImageFolder: `classes` classes, `per_class` images each, in `root/split`.
fn draw_split(root: &Path, split: &str, classes: usize, per_class: usize) {
    for c in 0..classes {
        let dir = root.join(split).join(format!("n{:08}", c + 1));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let img = image::RgbImage::from_fn(40, 36, |x, y| {
                let base = [
                    (c * 60 % 256) as u8,
                    (c * 110 % 256) as u8,
                    (c * 170 % 256) as u8,
                ];
                let noise = ((x * 7 + y * 13 + i as u32 * 31) % 40) as u8;
                image::Rgb([
                    base[0].wrapping_add(noise),
                    base[1].wrapping_add(noise / 2),
                    base[2],
                ])
            });
            img.save(dir.join(format!("img{i}.png"))).unwrap();
        }
    }
}

fn experiment(epochs: u32, batch_size: usize) -> String {
    format!(
        r#"
[experiment]
name = "te"

[datasets.toy]
root = "data"
splits = ["train", "val"]

[models.tiny]
path = "{}"
family = "classifier"

[nodes.clf]
kind = "train"
data = ["toy.train"]
model = "tiny"
epochs = {epochs}
batch_size = {batch_size}

[nodes.score]
kind = "eval"
classifier = "clf"
test = ["toy.val"]
"#,
        fixtures().join("resnet-tiny").display()
    )
}

fn toy_project(classes: usize, epochs: u32, batch_size: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    draw_split(&dir.path().join("data"), "train", classes, 6);
    draw_split(&dir.path().join("data"), "val", classes, 2);
    std::fs::write(dir.path().join("exp.toml"), experiment(epochs, batch_size)).unwrap();
    dir
}

/// The trained classifier's files that must not depend on timing (train_log.csv carries
/// images_per_sec, so it is left out).
fn trained_files(project: &Path) -> Vec<(String, Vec<u8>)> {
    let entries = entries(&project.join(".cip/cache"), "train");
    assert_eq!(entries.len(), 1, "one train entry");
    tree(&entries[0])
        .into_iter()
        .filter(|(p, _)| {
            [
                "model.onnx",
                "model.onnx.data",
                "classes.txt",
                "cip-model.toml",
            ]
            .contains(&p.as_str())
        })
        .collect()
}

#[test]
fn train_then_eval_then_cached_rerun() {
    let p = toy_project(4, 2, 8);
    let first = cip_ort(p.path(), &["run", "exp.toml"]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(summary(&first), (2, 0, 0));
    let files = trained_files(p.path());
    assert_eq!(
        files.len(),
        4,
        "{:?}",
        files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    let classes = String::from_utf8(
        files
            .iter()
            .find(|f| f.0 == "classes.txt")
            .unwrap()
            .1
            .clone(),
    )
    .unwrap();
    assert_eq!(classes, "n00000001\nn00000002\nn00000003\nn00000004\n");
    let entry = &entries(&p.path().join(".cip/cache"), "train")[0];
    // The output is a model directory cip itself accepts, without leftover checkpoints.
    cip::runtime::ModelDir::open(entry, Some(cip::runtime::Family::Classifier)).unwrap();
    assert!(!entry.join("checkpoint").exists());
    let log = std::fs::read_to_string(entry.join("train_log.csv")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines[0], "epoch,loss,lr,images_per_sec");
    assert_eq!(lines.len(), 3, "{log}");
    for line in &lines[1..] {
        let fields: Vec<f64> = line.split(',').map(|f| f.parse().unwrap()).collect();
        assert!(fields[1].is_finite() && fields[1] > 0.0, "{line}");
        assert!(fields[3] > 0.0, "{line}");
        eprintln!("train log: {line}");
    }
    let eval = &entries(&p.path().join(".cip/cache"), "eval")[0];
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(eval.join("metrics.json")).unwrap()).unwrap();
    let val = &metrics["toy.val"];
    assert_eq!(val["n"], 8, "{metrics}");
    let top1 = val["top1"].as_f64().unwrap();
    assert!(
        (0.0..=100.0).contains(&top1) && val["top5"].as_f64().unwrap() >= top1,
        "{metrics}"
    );
    let per_class = std::fs::read_to_string(eval.join("per_class.csv")).unwrap();
    assert_eq!(per_class.lines().count(), 5, "{per_class}");
    let confusion = std::fs::read_to_string(eval.join("confusion.csv")).unwrap();
    let counted: u64 = confusion
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(counted, 8, "{confusion}");

    let second = cip_ort(p.path(), &["run", "exp.toml"]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(summary(&second), (0, 2, 0));
}

/// The epoch of the train node's checkpoint, once there is one.
fn checkpoint_epoch(cache: &Path) -> Option<u32> {
    let file = walk(&cache.join("train"))
        .into_iter()
        .find(|f| f.ends_with("checkpoint/state.safetensors"))?;
    let bytes = std::fs::read(&file).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    meta.metadata().as_ref()?.get("epoch")?.parse().ok()
}

#[test]
fn kill_9_during_epoch_3_of_5_resumes_to_identical_weights() {
    let epochs = 5;
    // 160 images in batches of 4: an epoch lasts long enough to be caught in the middle.
    let project = || {
        let dir = tempfile::tempdir().unwrap();
        draw_split(&dir.path().join("data"), "train", 4, 40);
        draw_split(&dir.path().join("data"), "val", 4, 2);
        std::fs::write(dir.path().join("exp.toml"), experiment(epochs, 4)).unwrap();
        dir
    };
    let reference = project();
    let done = cip_ort(reference.path(), &["run", "exp.toml"]);
    assert!(done.status.success(), "{}", stderr(&done));

    let p = project();
    let mut child = ort_command(p.path(), &["run", "exp.toml", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cache = p.path().join(".cip/cache");
    let deadline = Instant::now() + Duration::from_secs(300);
    // The checkpoint of epoch 2 is written as epoch 3 starts.
    while checkpoint_epoch(&cache).is_none_or(|e| e < 2) {
        assert!(
            Instant::now() < deadline,
            "no checkpoint of epoch 2 appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        checkpoint_epoch(&cache),
        Some(2),
        "the kill must land in epoch 3"
    );
    assert!(entries(&cache, "train").is_empty());
    let rerun = cip_ort(p.path(), &["run", "exp.toml"]);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    assert!(
        stderr(&rerun).contains("resuming after epoch 2"),
        "the rerun must start from the checkpoint:\n{}",
        stderr(&rerun)
    );
    assert_eq!(trained_files(p.path()), trained_files(reference.path()));
    let log = std::fs::read_to_string(entries(&cache, "train")[0].join("train_log.csv")).unwrap();
    assert_eq!(log.lines().count(), epochs as usize + 1, "{log}");
}

fn failure(p: &Path) -> String {
    failure_at(p, "clf")
}

/// The error line of `node` from a failing `cip run`.
fn failure_at(p: &Path, node: &str) -> String {
    let out = cip_ort(p, &["run", "exp.toml"]);
    assert!(!out.status.success(), "must fail:\n{}", stdout(&out));
    let text = stderr(&out);
    let start = text.find(&format!("node `{node}`")).unwrap_or(0);
    let line = text[start..].lines().next().unwrap_or("").to_string();
    line.replace(
        &fixtures().join("resnet-tiny").display().to_string(),
        "<resnet-tiny>",
    )
}

#[test]
fn more_classes_than_outputs_is_an_error() {
    let p = toy_project(12, 1, 8);
    insta::assert_snapshot!(failure(p.path()));
}

#[test]
fn batch_size_larger_than_the_data_trains_one_batch_per_epoch() {
    let p = toy_project(2, 1, 500);
    let out = cip_ort(p.path(), &["run", "exp.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let entry = &entries(&p.path().join(".cip/cache"), "train")[0];
    let log = std::fs::read_to_string(entry.join("train_log.csv")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
}

// ---- membership inference ----

/// Best balanced accuracy by brute force: every observed score as threshold, plus +inf.
fn brute_force_attack(members: &[f64], nonmembers: &[f64]) -> f64 {
    let mut best: f64 = 0.5;
    for &t in members.iter().chain(nonmembers) {
        let tpr = members.iter().filter(|&&s| s >= t).count() as f64 / members.len() as f64;
        let tnr = nonmembers.iter().filter(|&&s| s < t).count() as f64 / nonmembers.len() as f64;
        best = best.max(0.5 * (tpr + tnr));
    }
    best
}

#[test]
fn membership_attack_scores_the_training_split_against_the_test_split() {
    let p = toy_project(3, 3, 6);
    let exp = experiment(3, 6).replace(
        "test = [\"toy.val\"]\n",
        "test = [\"toy.val\"]\nmembers = \"toy.train\"\n\n[report]\neval = [\"score\"]\nmetrics = [\"top1\"]\n",
    );
    std::fs::write(p.path().join("exp.toml"), exp).unwrap();
    let out = cip_ort(p.path(), &["run", "exp.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cache = p.path().join(".cip/cache");
    let eval = &entries(&cache, "eval")[0];
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(eval.join("metrics.json")).unwrap()).unwrap();
    let attack = &metrics["toy.val"]["membership"];
    assert_eq!(attack["members"], "toy.train", "{metrics}");
    assert_eq!(attack["n_members"], 18);
    assert_eq!(attack["n_nonmembers"], 6);

    // The member confidences, recomputed here through the library from the trained model.
    let trained = &entries(&cache, "train")[0];
    let mut classifier = Classifier::open(trained, test_session()).unwrap();
    let config = classifier.config.clone();
    let classes: Vec<String> = std::fs::read_to_string(trained.join("classes.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let split = cip::nodes::Artifact {
        ty: cip::nodes::ArtifactType::Images,
        dir: p.path().join("data/train"),
        origin: "dataset toy.train".into(),
        classes: None,
    };
    let images = cip::nodes::train::artifact_images(&split).unwrap();
    let paths: Vec<&Path> = images.iter().map(|i| i.path.as_path()).collect();
    let batch = cip::data::augment::eval_batch(
        &paths,
        config.image_size,
        cip::data::augment::Interpolation::Bicubic,
        config.mean,
        config.std,
    )
    .unwrap();
    let logits = classifier.forward(batch.view()).unwrap();
    let expected_members: Vec<f64> = images
        .iter()
        .zip(logits.rows())
        .map(|(image, row)| {
            let truth = classes.iter().position(|c| *c == image.class).unwrap();
            let max = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            (row[truth] as f64 - max).exp() / sum
        })
        .collect();

    let scores = std::fs::read_to_string(eval.join("membership_scores.csv")).unwrap();
    let (mut members, mut nonmembers) = (Vec::new(), Vec::new());
    for line in scores.lines().skip(1) {
        let (role, value) = line.split_once(',').unwrap();
        let value: f64 = value.parse().unwrap();
        assert!((0.0..=1.0).contains(&value), "{line}");
        match role {
            "member" => members.push(value),
            "nonmember" => nonmembers.push(value),
            other => panic!("unknown role {other}"),
        }
    }
    assert_eq!(members.len(), expected_members.len());
    for (got, want) in members.iter().zip(&expected_members) {
        assert!(
            (got - want).abs() < 1e-5,
            "member confidence {got} vs {want}"
        );
    }
    assert_eq!(nonmembers.len(), 6);
    let best = brute_force_attack(&members, &nonmembers);
    let reported = attack["balanced_accuracy"].as_f64().unwrap();
    assert!(
        (reported - 100.0 * best).abs() < 1e-9,
        "{reported} vs {}",
        100.0 * best
    );
    // The reported threshold reaches that accuracy.
    if let Some(t) = attack["threshold"].as_f64() {
        let tpr = members.iter().filter(|&&s| s >= t).count() as f64 / 18.0;
        let tnr = nonmembers.iter().filter(|&&s| s < t).count() as f64 / 6.0;
        assert!(
            (50.0 * (tpr + tnr) - reported).abs() < 1e-6,
            "threshold {t}"
        );
    }
    let summary_csv = std::fs::read_to_string(eval.join("membership.csv")).unwrap();
    assert!(
        summary_csv.starts_with("members,nonmembers,n_members,n_nonmembers,balanced_accuracy,threshold\ntoy.train,toy.val,18,6,"),
        "{summary_csv}"
    );

    // The report gets the attack as a column next to top-1.
    let table = std::fs::read_to_string(p.path().join("results/te/table.csv")).unwrap();
    let mut lines = table.lines();
    assert_eq!(lines.next(), Some("toy.val top1,toy.val membership"));
    let row = lines.next().unwrap();
    assert_eq!(row.split(',').nth(1).unwrap(), format!("{reported:.2}"));
}

#[test]
fn membership_nonmembers_must_name_a_test_set() {
    let p = toy_project(2, 1, 4);
    let exp = experiment(1, 4).replace(
        "test = [\"toy.val\"]\n",
        "test = [\"toy.val\"]\nmembers = \"toy.train\"\nnonmembers = \"toy.vall\"\n",
    );
    std::fs::write(p.path().join("exp.toml"), exp).unwrap();
    let out = cip_ort(p.path(), &["run", "exp.toml"]);
    assert!(!out.status.success());
    let text = stderr(&out);
    let line = text
        .lines()
        .find(|l| l.contains("nonmembers"))
        .unwrap_or_else(|| panic!("{text}"));
    // From the node name on: the entry key before it changes with the fixture.
    insta::assert_snapshot!(&line[line.find("node `score`").unwrap()..]);
}

// ---- real + synthetic mixing ----

fn mixed_project(mix: &str) -> tempfile::TempDir {
    let p = toy_project(3, 2, 6);
    draw_split(&p.path().join("data"), "extra", 3, 2);
    let exp = experiment(2, 6)
        .replace(
            "splits = [\"train\", \"val\"]",
            "splits = [\"train\", \"val\", \"extra\"]",
        )
        .replace(
            "data = [\"toy.train\"]\n",
            &format!("data = [\"toy.train\", \"toy.extra\"]\nmix = {mix}\n"),
        );
    std::fs::write(p.path().join("exp.toml"), exp).unwrap();
    p
}

#[test]
fn mix_draws_each_source_by_its_fraction() {
    // 18 train + 6 extra images: 24 samples per epoch, a quarter (6) from train, 18 from extra.
    let p = mixed_project("{ \"toy.train\" = 0.25 }");
    let out = cip_ort(p.path(), &["run", "exp.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let entry = &entries(&p.path().join(".cip/cache"), "train")[0];
    let mix = std::fs::read_to_string(entry.join("mix.csv")).unwrap();
    assert_eq!(
        mix,
        "source,images,samples_per_epoch\ntoy.train,18,6\ntoy.extra,6,18\n"
    );
    let log = std::fs::read_to_string(entry.join("train_log.csv")).unwrap();
    assert_eq!(log.lines().count(), 3, "{log}");

    // A different ratio is a different experiment (the key changes, the node reruns).
    let other = mixed_project("{ \"toy.train\" = 0.75 }");
    std::fs::rename(other.path().join("exp.toml"), p.path().join("exp.toml")).unwrap();
    let rerun = cip_ort(p.path(), &["run", "exp.toml"]);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    assert_eq!(summary(&rerun), (2, 0, 0));
}

#[test]
fn mix_must_name_a_data_source() {
    let p = mixed_project("{ \"toy.val\" = 0.5 }");
    insta::assert_snapshot!(failure(p.path()));
}

// ---- decode cache ----

fn cached_project(decode_cache: Option<u32>) -> tempfile::TempDir {
    let p = toy_project(3, 2, 6);
    if let Some(side) = decode_cache {
        let exp = experiment(2, 6).replace(
            "batch_size = 6\n",
            &format!("batch_size = 6\ndecode_cache = {side}\n"),
        );
        std::fs::write(p.path().join("exp.toml"), exp).unwrap();
    }
    p
}

fn train_only(p: &Path) -> Vec<(String, Vec<u8>)> {
    let out = cip_ort(p, &["run", "exp.toml", "--only", "clf"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let entry = &entries(&p.join(".cip/cache"), "train")[0];
    assert!(!entry.join("decode_cache").exists(), "the cache is scratch");
    trained_files(p)
}

#[test]
fn decode_cache_within_the_image_size_trains_exactly_as_decoding() {
    // The toy images are 40x36: a bound of 36 or more stores them as decoded.
    let plain = train_only(cached_project(None).path());
    assert_eq!(train_only(cached_project(Some(36)).path()), plain);
    // Shrinking (shorter side 36 -> 32) changes the crops' pixels: other weights, hence the key.
    let shrunk = train_only(cached_project(Some(32)).path());
    let weights = |files: &[(String, Vec<u8>)]| {
        files
            .iter()
            .find(|f| f.0 == "model.onnx.data")
            .unwrap()
            .1
            .clone()
    };
    assert_ne!(weights(&shrunk), weights(&plain));
}

#[test]
fn decode_cache_below_the_training_size_is_an_error() {
    let p = cached_project(Some(16));
    insta::assert_snapshot!(failure(p.path()));
}

// ---- cip classify ----

fn write_images(dir: &Path) -> Vec<PathBuf> {
    (0..2)
        .map(|i| {
            let path = dir.join(format!("img{i}.png"));
            image::RgbImage::from_fn(40 + 8 * i, 36, |x, y| {
                image::Rgb([(x * 6) as u8, (y * 7 + i * 90) as u8, ((x + y) * 3) as u8])
            })
            .save(&path)
            .unwrap();
            path
        })
        .collect()
}

#[test]
fn classify_prints_topk_of_an_exported_model() {
    let dir = tempfile::tempdir().unwrap();
    write_images(dir.path());
    let model = fixtures().join("resnet-tiny");
    let model = model.to_str().unwrap();
    let out = cip_ort(
        dir.path(),
        &[
            "classify", "--model", model, "--topk", "3", "img0.png", "img1.png",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    insta::assert_snapshot!(stdout(&out));

    // The probabilities are the softmax of the model's own logits.
    let args = cip::nodes::eval::classify::ClassifyArgs {
        model: fixtures().join("resnet-tiny"),
        topk: 10,
        images: write_images(dir.path()),
    };
    let ranked = cip::nodes::eval::classify::classify_files(&args).unwrap();
    let mut classifier = Classifier::open(&fixtures().join("resnet-tiny"), test_session()).unwrap();
    let c = classifier.config.clone();
    let paths: Vec<&Path> = args.images.iter().map(PathBuf::as_path).collect();
    let batch = cip::data::augment::eval_batch(
        &paths,
        c.image_size,
        cip::data::augment::Interpolation::Bicubic,
        c.mean,
        c.std,
    )
    .unwrap();
    let logits = classifier.forward(batch.view()).unwrap();
    for (top, row) in ranked.iter().zip(logits.rows()) {
        assert_eq!(top.len(), 10);
        let total: f32 = top.iter().map(|r| r.probability).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        for pair in top.windows(2) {
            assert!(pair[0].probability >= pair[1].probability);
        }
        let best = top[0]
            .label
            .trim_start_matches("output")
            .parse::<usize>()
            .unwrap();
        let argmax = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
            .unwrap();
        assert_eq!(best, argmax);
    }
}

#[test]
fn classify_labels_a_trained_classifier_by_its_classes() {
    let p = toy_project(3, 1, 6);
    let out = cip_ort(p.path(), &["run", "exp.toml", "--only", "clf"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let entry = entries(&p.path().join(".cip/cache"), "train")[0].clone();
    let image = p.path().join("data/val/n00000002/img0.png");
    let out = cip_ort(
        p.path(),
        &[
            "classify",
            "--model",
            entry.to_str().unwrap(),
            "--topk",
            "20",
            image.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    // 10 outputs, 3 trained classes named by their ids, the rest by index.
    assert_eq!(text.lines().count(), 11, "{text}");
    for id in ["n00000001", "n00000002", "n00000003", "output3", "output9"] {
        assert!(text.contains(&format!(" {id}  ")), "{id} missing:\n{text}");
    }
}

#[test]
fn classify_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.png"), "not an image").unwrap();
    write_images(dir.path());
    let classifier = fixtures().join("resnet-tiny");
    let other = fixtures().join("vit-gpt2-tiny");
    let cases: [(&str, Vec<&str>); 3] = [
        (
            "not_an_image",
            vec![
                "--model",
                classifier.to_str().unwrap(),
                "img0.png",
                "notes.png",
            ],
        ),
        (
            "wrong_family",
            vec!["--model", other.to_str().unwrap(), "img0.png"],
        ),
        (
            "topk_zero",
            vec![
                "--model",
                classifier.to_str().unwrap(),
                "--topk",
                "0",
                "img0.png",
            ],
        ),
    ];
    for (name, args) in cases {
        let mut all = vec!["classify"];
        all.extend(args);
        let out = cip_ort(dir.path(), &all);
        assert!(!out.status.success(), "{name} must fail");
        let text = stderr(&out).replace(&fixtures().display().to_string(), "<fixtures>");
        insta::assert_snapshot!(format!("classify_error_{name}"), text);
    }
}

// ---- learning and the remaining errors ----

/// Horizontal (class 1) or vertical (class 2) stripes: random period, phase and colours, plus
/// pixel noise. Crops and horizontal flips keep the orientation, so the label stays true.
fn draw_stripes(root: &Path, split: &str, per_class: usize, seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for (c, horizontal) in [(1, true), (2, false)] {
        let dir = root.join(split).join(format!("n{c:08}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let period = rng.random_range(4..=8u32);
            let phase = rng.random_range(0..period);
            let dark: [u8; 3] = [
                rng.random_range(0..90),
                rng.random_range(0..90),
                rng.random_range(0..90),
            ];
            let light: [u8; 3] = [
                rng.random_range(160..=255),
                rng.random_range(160..=255),
                rng.random_range(160..=255),
            ];
            let noise: Vec<u8> = (0..40 * 40).map(|_| rng.random_range(0..30)).collect();
            let img = image::RgbImage::from_fn(40, 40, |x, y| {
                let along = if horizontal { y } else { x };
                let base = if (along + phase) % period < period / 2 {
                    dark
                } else {
                    light
                };
                let n = noise[(y * 40 + x) as usize];
                image::Rgb(base.map(|v| v.saturating_add(n)))
            });
            img.save(dir.join(format!("img{i}.png"))).unwrap();
        }
    }
}

#[test]
fn training_learns_stripe_orientation() {
    let p = tempfile::tempdir().unwrap();
    draw_stripes(&p.path().join("data"), "train", 48, 1);
    draw_stripes(&p.path().join("data"), "val", 30, 2);
    let exp =
        experiment(12, 16).replace("batch_size = 16\n", "batch_size = 16\nmilestones = [8]\n");
    std::fs::write(p.path().join("exp.toml"), exp).unwrap();
    let out = cip_ort(p.path(), &["run", "exp.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let eval = &entries(&p.path().join(".cip/cache"), "eval")[0];
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(eval.join("metrics.json")).unwrap()).unwrap();
    let top1 = metrics["toy.val"]["top1"].as_f64().unwrap();
    let train = &entries(&p.path().join(".cip/cache"), "train")[0];
    let log = std::fs::read_to_string(train.join("train_log.csv")).unwrap();
    assert!(top1 >= 95.0, "top-1 {top1} on 60 held-out images\n{log}");
    assert_eq!(metrics["toy.val"]["n"], 60);
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    // lr 0.1 for two epochs, then x1e30: the third epoch diverges.
    let p = toy_project(3, 4, 6);
    let exp = experiment(4, 6).replace(
        "batch_size = 6\n",
        "batch_size = 6\nmilestones = [2]\ngamma = 1e30\n",
    );
    std::fs::write(p.path().join("exp.toml"), exp).unwrap();
    let out = cip_ort(p.path(), &["run", "exp.toml"]);
    assert!(!out.status.success());
    let text = stderr(&out);
    let line = text
        .lines()
        .find(|l| l.contains("loss became"))
        .unwrap_or_else(|| panic!("{text}"));
    // Whether the blow-up shows as inf or NaN first is the CPU's business.
    let line = line[line.rfind("node `clf`").unwrap()..].replace("became inf", "became NaN");
    insta::assert_snapshot!(line);
    let checkpoint = walk(&p.path().join(".cip/cache/train"))
        .into_iter()
        .find(|f| f.ends_with("checkpoint/state.safetensors"))
        .expect("the checkpoint of epoch 2 stays");
    let bytes = std::fs::read(&checkpoint).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["epoch"], "2");
    let state = TrainState::read(
        &checkpoint,
        &Classifier::open(&fixtures().join("resnet-tiny"), test_session())
            .unwrap()
            .state_names(),
        "",
    )
    .unwrap();
    assert!(state
        .tensors
        .iter()
        .all(|(_, t)| t.iter().all(|v| v.is_finite())));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn empty_training_set_is_an_error() {
    let p = toy_project(2, 1, 4);
    let train = p.path().join("data/train");
    std::fs::remove_dir_all(&train).unwrap();
    std::fs::create_dir_all(train.join("n00000001")).unwrap();
    // An empty split directory: the dataset check stops the run before any node starts.
    insta::assert_snapshot!("empty_split_directory", failure(p.path()));
    // A split whose manifest lists no images reaches the node.
    std::fs::write(train.join("manifest.csv"), "path,class\n").unwrap();
    insta::assert_snapshot!("empty_manifest", failure(p.path()));
}

#[test]
fn a_test_class_the_classifier_lacks_is_named() {
    let p = toy_project(3, 1, 6);
    draw_split(&p.path().join("data"), "val", 4, 1);
    insta::assert_snapshot!(failure_at(p.path(), "score"));
    // Told to, eval leaves them out and counts them.
    let exp = experiment(1, 6).replace(
        "test = [\"toy.val\"]\n",
        "test = [\"toy.val\"]\nskip_unknown_classes = true\n",
    );
    std::fs::write(p.path().join("exp.toml"), exp).unwrap();
    let out = cip_ort(p.path(), &["run", "exp.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let eval = &entries(&p.path().join(".cip/cache"), "eval")[0];
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(eval.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["toy.val"]["skipped"], 1, "{metrics}");
}

#[test]
fn eval_center_crop_is_a_different_evaluation() {
    let p = toy_project(3, 1, 6);
    let out = cip_ort(p.path(), &["run", "exp.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let exp = experiment(1, 6).replace(
        "test = [\"toy.val\"]\n",
        "test = [\"toy.val\"]\nresize = { mode = \"center_crop\", crop_pct = 0.875 }\n",
    );
    std::fs::write(p.path().join("exp.toml"), exp).unwrap();
    let out = cip_ort(p.path(), &["run", "exp.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Train cached, eval rerun under its own key.
    assert_eq!(summary(&out), (1, 1, 0));
    assert_eq!(entries(&p.path().join(".cip/cache"), "eval").len(), 2);
}
