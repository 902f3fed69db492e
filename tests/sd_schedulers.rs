//! The schedulers against diffusers: timesteps, sigmas and full trajectories recorded by
//! `models/cip_export/noise_schedulers.py` (tests/fixtures/reference/schedulers/), replayed step
//! by step (each step from diffusers' own previous sample) and chained (each step from ours).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cip::models::sd::noise::{randn_tensor, TorchGenerator};
use cip::models::sd::schedulers::{build, Scheduler, SchedulerConfig, SchedulerKind};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use serde_json::Value;

/// Largest error allowed on a sample, relative to the scale of the step: max(1, |diffusers'
/// value|, |the step's input value|). torch's float32 `sqrt` is not correctly rounded (on this
/// machine's MKL about a fifth of results are one ulp off, and which ones depends on the CPU), so
/// scheduler coefficients can differ from ours by an ulp; a step that cancels large inputs
/// (zero-SNR Euler starts at sigma 4096) turns that into an error proportional to its input.
const SAMPLE_TOLERANCE: f64 = 1e-5;
/// Largest error allowed on sigmas, init_noise_sigma and fractional timesteps, relative.
const SCHEDULE_TOLERANCE: f64 = 1e-6;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/schedulers")
}

#[derive(Deserialize)]
struct Index {
    base_config: String,
    cases: Vec<TrajectoryCase>,
    schedules: Schedules,
}

#[derive(Deserialize)]
struct TrajectoryCase {
    name: String,
    kind: String,
    overrides: serde_json::Map<String, Value>,
    num_inference_steps: usize,
    shape: Vec<usize>,
    generator_seeds: Vec<u64>,
    tensors: String,
    init_noise_sigma: f64,
    order: usize,
    model_calls: usize,
    scales_model_input: bool,
}

#[derive(Deserialize)]
struct Schedules {
    tensors: String,
    cases: Vec<ScheduleCase>,
}

#[derive(Deserialize)]
struct ScheduleCase {
    kind: String,
    overrides: serde_json::Map<String, Value>,
    num_inference_steps: usize,
    key: String,
    init_noise_sigma: f64,
}

fn load_index() -> Index {
    let text = std::fs::read_to_string(fixture_dir().join("index.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every tensor of a safetensors file as f64 (f32 and i64 convert exactly).
fn load_tensors(file: &str) -> HashMap<String, Vec<f64>> {
    let bytes = std::fs::read(fixture_dir().join(file)).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
                    .collect(),
                Dtype::I64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{file}: {name} has unexpected dtype {other:?}"),
            };
            (name, values)
        })
        .collect()
}

fn as_f32(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

/// The SD-1.5 scheduler config with a case's overrides, as `from_config(config, **overrides)`.
fn config_with(base: &Value, overrides: &serde_json::Map<String, Value>) -> SchedulerConfig {
    let mut merged = base.clone();
    let object = merged.as_object_mut().unwrap();
    for (key, value) in overrides {
        object.insert(key.clone(), value.clone());
    }
    SchedulerConfig::from_json_value(merged).unwrap()
}

fn base_config(index: &Index) -> Value {
    let text = std::fs::read_to_string(fixture_dir().join(&index.base_config)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Max of |ours - theirs| / max(1, |theirs|, |input|), and max |ours - theirs|.
fn errors(ours: &[f32], theirs: &[f64], input: &[f32]) -> (f64, f64) {
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours.len(), input.len());
    ours.iter()
        .zip(theirs)
        .zip(input)
        .fold((0.0, 0.0), |(rel, abs), ((&a, &b), &x)| {
            let d = (f64::from(a) - b).abs();
            let scale = b.abs().max(f64::from(x).abs()).max(1.0);
            (f64::max(rel, d / scale), f64::max(abs, d))
        })
}

fn relative_error(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
    }
}

/// Checks timesteps (exact, or within SCHEDULE_TOLERANCE for fractional ones), sigmas and
/// init_noise_sigma; returns the largest relative sigma error.
fn check_schedule(
    name: &str,
    scheduler: &dyn Scheduler,
    timesteps: &[f64],
    sigmas: Option<&Vec<f64>>,
    init_noise_sigma: f64,
) -> f64 {
    let ours = scheduler.timesteps();
    assert_eq!(ours.len(), timesteps.len(), "{name}: timestep count");
    for (i, (&a, &b)) in ours.iter().zip(timesteps).enumerate() {
        let integral = b.fract() == 0.0;
        let error = relative_error(f64::from(a), b).min((f64::from(a) - b).abs());
        assert!(
            if integral {
                f64::from(a) == b
            } else {
                error <= SCHEDULE_TOLERANCE
            },
            "{name}: timestep {i}: ours {a}, diffusers {b}"
        );
    }
    let mut worst: f64 = 0.0;
    match (scheduler.sigmas(), sigmas) {
        (Some(ours), Some(theirs)) => {
            assert_eq!(ours.len(), theirs.len(), "{name}: sigma count");
            for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
                let error = relative_error(f64::from(a), b);
                assert!(
                    error <= SCHEDULE_TOLERANCE,
                    "{name}: sigma {i}: ours {a:e}, diffusers {b:e}"
                );
                worst = worst.max(error);
            }
        }
        (None, None) => {}
        (ours, theirs) => panic!(
            "{name}: sigmas: ours {:?}, diffusers {:?}",
            ours.is_some(),
            theirs.is_some()
        ),
    }
    let error = relative_error(f64::from(scheduler.init_noise_sigma()), init_noise_sigma);
    assert!(
        error <= SCHEDULE_TOLERANCE,
        "{name}: init_noise_sigma: ours {}, diffusers {init_noise_sigma}",
        scheduler.init_noise_sigma()
    );
    worst.max(error)
}

fn new_scheduler(case: &TrajectoryCase, base: &Value) -> Box<dyn Scheduler> {
    let kind: SchedulerKind = case.kind.parse().unwrap();
    let mut scheduler = build(kind, &config_with(base, &case.overrides)).unwrap();
    scheduler.set_timesteps(case.num_inference_steps).unwrap();
    scheduler
}

/// The generators of a case, after drawing the initial latents (as the pipeline does).
fn generators_and_latents(case: &TrajectoryCase) -> (Vec<TorchGenerator>, Vec<f32>) {
    let mut generators: Vec<TorchGenerator> = case
        .generator_seeds
        .iter()
        .map(|&s| TorchGenerator::new(s))
        .collect();
    let latents = randn_tensor(&mut generators, &case.shape).unwrap();
    (generators, latents)
}

struct CaseErrors {
    step_rel: f64,
    step_abs: f64,
    chained_rel: f64,
    final_rel: f64,
    final_abs: f64,
}

fn run_case(case: &TrajectoryCase, base: &Value) -> CaseErrors {
    let name = &case.name;
    let reference = load_tensors(&case.tensors);
    let tensor = |key: String| -> &Vec<f64> {
        reference
            .get(&key)
            .unwrap_or_else(|| panic!("{name}: no tensor {key}"))
    };

    let mut scheduler = new_scheduler(case, base);
    check_schedule(
        name,
        scheduler.as_ref(),
        tensor("timesteps".into()),
        reference.get("sigmas"),
        case.init_noise_sigma,
    );
    assert_eq!(
        scheduler.model_calls(),
        case.model_calls,
        "{name}: model calls"
    );
    assert_eq!(scheduler.order(), case.order, "{name}: order");

    // The initial latents are torch.randn from the case's generator(s), bit for bit.
    let (mut generators, latents) = generators_and_latents(case);
    assert_eq!(latents, as_f32(tensor("latents".into())), "{name}: latents");
    let sigma = scheduler.init_noise_sigma();
    let initial: Vec<f32> = latents.iter().map(|&x| x * sigma).collect();
    let (initial_rel, _) = errors(&initial, tensor("initial_sample".into()), &initial);
    assert!(initial_rel <= SCHEDULE_TOLERANCE, "{name}: initial sample");

    // Step by step: every step starts from diffusers' own previous sample.
    let steps = case.model_calls;
    let (mut step_rel, mut step_abs) = (0.0f64, 0.0f64);
    let mut sample = as_f32(tensor("initial_sample".into()));
    for i in 0..steps {
        let model_input = scheduler.scale_model_input(&sample, i).unwrap();
        if case.scales_model_input {
            let expected = tensor(format!("step{i:03}/model_input"));
            let (rel, _) = errors(&model_input, expected, &sample);
            assert!(
                rel <= SAMPLE_TOLERANCE,
                "{name}: step {i} model input: {rel:e}"
            );
        } else {
            assert!(
                matches!(model_input, std::borrow::Cow::Borrowed(_)),
                "{name}: step {i}: this scheduler does not scale its input"
            );
        }
        let model_output = as_f32(tensor(format!("step{i:03}/model_output")));
        let prev = scheduler
            .step(&model_output, i, &sample, &mut generators)
            .unwrap();
        let expected = tensor(format!("step{i:03}/prev_sample"));
        let (rel, abs) = errors(&prev, expected, &sample);
        assert!(
            rel <= SAMPLE_TOLERANCE,
            "{name}: step {i}: relative error {rel:e} (abs {abs:e})"
        );
        step_rel = step_rel.max(rel);
        step_abs = step_abs.max(abs);
        sample = as_f32(expected);
    }

    // Chained: from our own initial sample, each step from our previous one. An error made early
    // is carried along, so it is measured against the largest magnitude seen so far.
    let mut scheduler = new_scheduler(case, base);
    let (mut generators, latents) = generators_and_latents(case);
    let sigma = scheduler.init_noise_sigma();
    let mut sample: Vec<f32> = latents.iter().map(|&x| x * sigma).collect();
    let mut magnitude = 1.0f64;
    let mut chained_rel = 0.0f64;
    for i in 0..steps {
        magnitude = sample
            .iter()
            .fold(magnitude, |m, &x| m.max(f64::from(x).abs()));
        let model_output = as_f32(tensor(format!("step{i:03}/model_output")));
        sample = scheduler
            .step(&model_output, i, &sample, &mut generators)
            .unwrap();
        let (_, abs) = errors(&sample, tensor(format!("step{i:03}/prev_sample")), &sample);
        chained_rel = chained_rel.max(abs / magnitude);
    }
    let last = tensor(format!("step{:03}/prev_sample", steps - 1));
    let (final_rel, final_abs) = errors(&sample, last, &sample);
    assert!(
        chained_rel <= SAMPLE_TOLERANCE,
        "{name}: chained trajectory: error {chained_rel:e} of the largest magnitude so far"
    );
    CaseErrors {
        step_rel,
        step_abs,
        chained_rel,
        final_rel,
        final_abs,
    }
}

#[test]
fn trajectories_match_diffusers() {
    let index = load_index();
    let base = base_config(&index);
    let kinds: std::collections::HashSet<&str> =
        index.cases.iter().map(|c| c.kind.as_str()).collect();
    assert_eq!(
        kinds.len(),
        SchedulerKind::ALL.len(),
        "every kind has cases"
    );
    let mut worst = ("", 0.0f64, 0.0f64, 0.0f64);
    println!(
        "{:<70} {:>10} {:>10} {:>10} {:>10}",
        "case", "step rel", "step abs", "chain rel", "final abs"
    );
    for case in &index.cases {
        let e = run_case(case, &base);
        println!(
            "{:<70} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e}",
            case.name, e.step_rel, e.step_abs, e.chained_rel, e.final_abs
        );
        if e.chained_rel.max(e.step_rel) > worst.1.max(worst.2) {
            worst = (&case.name, e.step_rel, e.chained_rel, e.final_rel);
        }
    }
    println!(
        "{} cases; worst: {} (step {:.2e}, chained {:.2e}, final {:.2e})",
        index.cases.len(),
        worst.0,
        worst.1,
        worst.2,
        worst.3
    );
}

#[test]
fn schedules_match_diffusers_for_many_step_counts() {
    let index = load_index();
    let base = base_config(&index);
    let tensors = load_tensors(&index.schedules.tensors);
    let mut worst: f64 = 0.0;
    for case in &index.schedules.cases {
        let kind: SchedulerKind = case.kind.parse().unwrap();
        let mut scheduler = build(kind, &config_with(&base, &case.overrides)).unwrap();
        scheduler.set_timesteps(case.num_inference_steps).unwrap();
        let name = format!(
            "{} {:?} {}",
            case.kind, case.overrides, case.num_inference_steps
        );
        worst = worst.max(check_schedule(
            &name,
            scheduler.as_ref(),
            &tensors[&format!("{}/timesteps", case.key)],
            tensors.get(&format!("{}/sigmas", case.key)),
            case.init_noise_sigma,
        ));
    }
    println!(
        "{} schedules; worst relative sigma / init_noise_sigma error {worst:.2e}",
        index.schedules.cases.len()
    );
}

#[test]
fn sd15_config_file_reads_as_diffusers_reads_it() {
    let path = fixture_dir().join("sd15_scheduler_config.json");
    let config = SchedulerConfig::from_file(&path).unwrap();
    assert_eq!(config.num_train_timesteps, 1000);
    assert_eq!(config.beta_start, 0.00085);
    assert_eq!(config.steps_offset, 1);
    assert!(config.skip_prk_steps);
    assert_eq!(config.set_alpha_to_one, Some(false));
    assert_eq!(config.clip_sample, Some(false));
    // Absent from the file: each scheduler falls back to its own default.
    assert_eq!(config.timestep_spacing, None);
    assert_eq!(config.source.as_deref(), Some(path.as_path()));
}

fn sd15() -> SchedulerConfig {
    SchedulerConfig::from_file(fixture_dir().join("sd15_scheduler_config.json")).unwrap()
}

#[test]
fn unknown_scheduler_name_lists_the_valid_ones() {
    let error = "euler_a".parse::<SchedulerKind>().unwrap_err();
    insta::assert_snapshot!("unknown_name_close_to_a_valid_one", error.to_string());
    let error = "lms".parse::<SchedulerKind>().unwrap_err();
    insta::assert_snapshot!("unknown_name", error.to_string());
}

#[test]
fn invalid_config_value_names_the_file_and_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(
        &path,
        "{\n  \"beta_schedule\": \"cosine\",\n  \"num_train_timesteps\": 1000\n}\n",
    )
    .unwrap();
    let error = SchedulerConfig::from_file(&path).unwrap_err().to_string();
    let error = error.replace(&dir.path().display().to_string(), "<dir>");
    insta::assert_snapshot!("unknown_beta_schedule", error);
}

#[test]
fn unsupported_options_are_errors_not_ignored() {
    let mut config = sd15();
    config.thresholding = true;
    let error = build(SchedulerKind::Ddim, &config).unwrap_err().to_string();
    insta::assert_snapshot!(
        "thresholding",
        error.replace(env!("CARGO_MANIFEST_DIR"), "<repo>")
    );

    let mut config = sd15();
    config.variance_type = Some("learned_range".to_owned());
    let error = build(SchedulerKind::DpmPp2m, &config)
        .unwrap_err()
        .to_string();
    insta::assert_snapshot!(
        "variance_type",
        error.replace(env!("CARGO_MANIFEST_DIR"), "<repo>")
    );

    let config = SchedulerConfig::from_json_str(r#"{"trained_betas": [0.1, 0.2]}"#).unwrap();
    let error = build(SchedulerKind::Euler, &config)
        .unwrap_err()
        .to_string();
    insta::assert_snapshot!("trained_betas_length", error);
}

#[test]
fn stepping_errors_are_clear() {
    let config = sd15();
    let mut scheduler = build(SchedulerKind::EulerAncestral, &config).unwrap();
    insta::assert_snapshot!(
        "zero_steps",
        scheduler.set_timesteps(0).unwrap_err().to_string()
    );
    scheduler.set_timesteps(4).unwrap();
    let sample = vec![0.5f32; 16];
    let error = scheduler.step(&sample, 1, &sample, &mut []).unwrap_err();
    insta::assert_snapshot!("step_out_of_order", error.to_string());
    let error = scheduler.step(&sample, 0, &sample, &mut []).unwrap_err();
    insta::assert_snapshot!("ancestral_without_generator", error.to_string());
    let error = scheduler
        .step(&sample[..8], 0, &sample, &mut [TorchGenerator::new(0)])
        .unwrap_err();
    insta::assert_snapshot!("model_output_length", error.to_string());

    let mut config = sd15();
    config.skip_prk_steps = false;
    let mut scheduler = build(SchedulerKind::Pndm, &config).unwrap();
    insta::assert_snapshot!(
        "prk_too_few_steps",
        scheduler.set_timesteps(3).unwrap_err().to_string()
    );
}

#[test]
fn set_timesteps_restarts_the_history() {
    // A second run on the same scheduler equals a run on a fresh one.
    let config = sd15();
    for kind in SchedulerKind::ALL {
        let run = |scheduler: &mut Box<dyn Scheduler>| -> Vec<f32> {
            scheduler.set_timesteps(6).unwrap();
            let mut generator = [TorchGenerator::new(3)];
            let mut sample = generator[0].randn(&[1, 4, 4, 4]);
            let mut outputs = TorchGenerator::new(4);
            for i in 0..scheduler.model_calls() {
                let output = outputs.randn(&[1, 4, 4, 4]);
                sample = scheduler.step(&output, i, &sample, &mut generator).unwrap();
            }
            sample
        };
        let mut reused = build(kind, &config).unwrap();
        let first = run(&mut reused);
        let second = run(&mut reused);
        assert_eq!(first, second, "{kind}");
    }
}
