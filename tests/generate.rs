//! Stable Diffusion on ONNX Runtime against diffusers' own images for the tiny fixture
//! (tests/fixtures/reference/sd/, written by models/cip_export/sd.py), and the `generate` node.

use std::path::{Path, PathBuf};

use cip::models::sd::pipeline::{Pipeline, PipelineError, Request, Settings};
use cip::runtime::SessionConfig;
use serde::Deserialize;

/// Largest allowed difference of one 8-bit channel value from diffusers' PNG. ONNX Runtime's
/// kernels and torch's differ in float rounding; 8 denoising steps amplify that a little.
const MAX_PIXEL_DIFF: i32 = 2;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> PathBuf {
    repo().join("tests/fixtures/sd-tiny")
}

fn reference_dir() -> PathBuf {
    repo().join("tests/fixtures/reference/sd")
}

#[derive(Deserialize)]
struct Index {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    id: String,
    file: String,
    prompt: String,
    negative_prompt: Option<String>,
    prompt_ids: Vec<u32>,
    negative_prompt_ids: Option<Vec<u32>>,
    prompt_truncated: bool,
    scheduler: String,
    seed: u64,
    steps: usize,
    guidance: f32,
    width: usize,
    height: usize,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(reference_dir().join("index.json")).unwrap();
    serde_json::from_str::<Index>(&text).unwrap().cases
}

fn single_thread() -> SessionConfig {
    SessionConfig {
        intra_threads: Some(1),
        ..SessionConfig::default()
    }
}

fn open() -> Pipeline {
    Pipeline::open(&model_dir(), &single_thread()).unwrap()
}

#[test]
fn token_ids_equal_the_clip_tokenizer() {
    let pipeline = open();
    let cases = cases();
    assert!(cases.iter().any(|c| c.prompt_truncated));
    for case in &cases {
        assert_eq!(
            pipeline.tokenize(&case.prompt).unwrap(),
            case.prompt_ids,
            "{}",
            case.id
        );
        if let (Some(text), Some(ids)) = (&case.negative_prompt, &case.negative_prompt_ids) {
            assert_eq!(&pipeline.tokenize(text).unwrap(), ids, "{}", case.id);
        }
    }
}

/// The fp16 export of the same weights (the GPU dtype), run on the CPU provider, against
/// diffusers' fp32 images. fp16 keeps ~3 significant digits, so the bound is looser than
/// MAX_PIXEL_DIFF; a wrong cast (e.g. float16 bits read as float32) gives noise, far outside it.
const FP16_MEAN_PIXEL_DIFF: f64 = 0.25;
const FP16_MAX_PIXEL_DIFF: i32 = 4;

#[test]
fn fp16_export_matches_the_fp32_references_closely() {
    let mut pipeline = Pipeline::open(
        &repo().join("tests/fixtures/sd-tiny-fp16"),
        &single_thread(),
    )
    .unwrap();
    for case in cases()
        .iter()
        .filter(|c| c.scheduler == "pndm" || c.scheduler == "euler-a")
    {
        let settings = Settings {
            scheduler: case.scheduler.parse().unwrap(),
            steps: case.steps,
            guidance: case.guidance,
            width: case.width,
            height: case.height,
        };
        let request = Request {
            prompt: case.prompt.clone(),
            negative_prompt: case.negative_prompt.clone(),
            seed: case.seed,
        };
        let image = pipeline.generate(&settings, &[request]).unwrap().remove(0);
        let reference = image::open(reference_dir().join(&case.file))
            .unwrap()
            .to_rgb8();
        let diffs: Vec<i32> = image
            .pixels
            .iter()
            .zip(reference.as_raw())
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .collect();
        let max = *diffs.iter().max().unwrap();
        let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
        eprintln!(
            "{} fp16: max pixel difference {max}, mean {mean:.3}",
            case.id
        );
        assert!(
            max <= FP16_MAX_PIXEL_DIFF && mean <= FP16_MEAN_PIXEL_DIFF,
            "{}: fp16 image differs from the fp32 reference by max {max}, mean {mean:.3}",
            case.id
        );
    }
}

#[test]
fn every_reference_image_matches_diffusers() {
    let mut pipeline = open();
    let mut worst = (0, String::new());
    for case in cases() {
        let settings = Settings {
            scheduler: case.scheduler.parse().unwrap(),
            steps: case.steps,
            guidance: case.guidance,
            width: case.width,
            height: case.height,
        };
        let request = Request {
            prompt: case.prompt.clone(),
            negative_prompt: case.negative_prompt.clone(),
            seed: case.seed,
        };
        let image = pipeline.generate(&settings, &[request]).unwrap().remove(0);
        let reference = image::open(reference_dir().join(&case.file))
            .unwrap()
            .to_rgb8();
        assert_eq!(
            (image.width as u32, image.height as u32),
            reference.dimensions(),
            "{}",
            case.id
        );
        let diff = image
            .pixels
            .iter()
            .zip(reference.as_raw())
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .max()
            .unwrap();
        eprintln!("{}: max pixel difference {diff}", case.id);
        if diff > worst.0 {
            worst = (diff, case.id.clone());
        }
        assert!(
            diff <= MAX_PIXEL_DIFF,
            "{}: max pixel difference {diff} > {MAX_PIXEL_DIFF}",
            case.id
        );
    }
    eprintln!("worst case: {} (max difference {})", worst.1, worst.0);
}

#[test]
fn a_batch_gives_each_image_as_if_made_alone() {
    let mut pipeline = open();
    let settings = Settings {
        scheduler: "euler-a".parse().unwrap(),
        steps: 3,
        guidance: 7.5,
        width: 16,
        height: 16,
    };
    let requests = [
        Request {
            prompt: "a photo of tench".into(),
            negative_prompt: None,
            seed: 5,
        },
        Request {
            prompt: "a dog running on the grass".into(),
            negative_prompt: Some("blurry".into()),
            seed: 9,
        },
    ];
    let together = pipeline.generate(&settings, &requests).unwrap();
    for (request, image) in requests.iter().zip(&together) {
        let alone = pipeline
            .generate(&settings, std::slice::from_ref(request))
            .unwrap()
            .remove(0);
        let diff = alone
            .pixels
            .iter()
            .zip(&image.pixels)
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .max()
            .unwrap();
        assert!(diff <= 1, "batched image differs by {diff}");
    }
    assert_ne!(together[0].pixels, together[1].pixels);
}

fn pipeline_error(settings: Settings, requests: &[Request]) -> String {
    let mut pipeline = open();
    let error: PipelineError = pipeline.generate(&settings, requests).unwrap_err();
    error.to_string()
}

fn one_request() -> Vec<Request> {
    vec![Request {
        prompt: "a photo of tench".into(),
        negative_prompt: None,
        seed: 0,
    }]
}

fn settings() -> Settings {
    Settings {
        scheduler: "pndm".parse().unwrap(),
        steps: 2,
        guidance: 7.5,
        width: 16,
        height: 16,
    }
}

#[test]
fn size_not_divisible_is_an_error() {
    let message = pipeline_error(
        Settings {
            width: 18,
            ..settings()
        },
        &one_request(),
    );
    insta::assert_snapshot!("size_not_divisible", message);
}

#[test]
fn zero_steps_is_an_error() {
    let message = pipeline_error(
        Settings {
            steps: 0,
            ..settings()
        },
        &one_request(),
    );
    insta::assert_snapshot!("zero_steps", message);
}

#[test]
fn empty_prompt_list_is_an_error() {
    insta::assert_snapshot!("empty_prompt_list", pipeline_error(settings(), &[]));
}

#[test]
fn unknown_scheduler_name_is_an_error() {
    let error = "pndn"
        .parse::<cip::models::sd::schedulers::SchedulerKind>()
        .unwrap_err();
    insta::assert_snapshot!("unknown_scheduler", error.to_string());
}

// ---------------------------------------------------------------- the node through `cip run`

mod common;

use common::{cip, entries, run_and_kill_9, stderr, stdout, summary, tree};

fn experiment(images_per_prompt: usize) -> String {
    format!(
        r#"
[experiment]
name = "generate"
seed = 7

[models.sd]
path = "{model}"
family = "sd"

[nodes.prompts]
kind = "compose"
classes = "classes.csv"
per_class = 3
template = "a photo of {{class}}"
negative_prompt = "blurry"

[nodes.images]
kind = "generate"
prompts = "prompts"
model = "sd"
scheduler = "euler-a"
steps = 3
guidance = 7.5
images_per_prompt = {images_per_prompt}
batch_size = 2
"#,
        model = model_dir().display()
    )
}

fn project(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("exp.toml"), text).unwrap();
    std::fs::write(
        dir.path().join("classes.csv"),
        "id,name\nn01440764,tench\nn03888257,parachute\n",
    )
    .unwrap();
    dir
}

/// The generate entry's output files (images and manifest), without journals and metadata.
fn outputs(cache: &Path) -> Vec<(String, Vec<u8>)> {
    tree(&cache.join("generate"))
        .into_iter()
        .filter(|(p, _)| p.ends_with(".png") || p.ends_with("manifest.csv"))
        .map(|(p, bytes)| (p.split_once('/').unwrap().1.to_string(), bytes))
        .collect()
}

#[test]
fn generate_node_writes_an_image_folder_and_a_second_run_is_cached() {
    let p = project(&experiment(2));
    let first = cip(p.path(), &["run", "exp.toml"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let cache = p.path().join(".cip/cache");
    let entry = entries(&cache, "generate");
    assert_eq!(entry.len(), 1);
    let manifest = cip::data::CsvTable::read(&entry[0].join("manifest.csv")).unwrap();
    assert_eq!(
        manifest.headers,
        [
            "id",
            "path",
            "class",
            "prompt",
            "negative_prompt",
            "seed",
            "steps",
            "scheduler",
            "guidance",
            "size"
        ]
    );
    // 2 classes x 3 prompts x 2 images.
    assert_eq!(manifest.rows.len(), 12);
    let mut seeds = std::collections::HashSet::new();
    for row in &manifest.rows {
        let image = image::open(entry[0].join(&row[1])).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (16, 16), "the model's default size");
        assert!(row[1].starts_with(&format!("{}/", &row[2])));
        assert_eq!(&row[4], "blurry");
        assert_eq!((&row[6], &row[7], &row[9]), ("3", "euler-a", "16x16"));
        assert!(
            seeds.insert(row[5].to_string()),
            "every image has its own seed"
        );
    }
    let ids: Vec<&str> = manifest.rows.iter().map(|r| &r[0]).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "manifest sorted by id");

    // The seed of the first image of a prompt does not depend on how many images each prompt
    // gets: image k of a prompt is the same image in both runs.
    let q = project(&experiment(1));
    assert!(cip(q.path(), &["run", "exp.toml"]).status.success());
    let one = outputs(&q.path().join(".cip/cache"));
    let two = outputs(&cache);
    for (path, bytes) in one.iter().filter(|(p, _)| p.ends_with(".png")) {
        let same = two.iter().find(|(p, _)| p == path).expect("image in both");
        assert_eq!(&same.1, bytes, "{path}");
    }

    let before = tree(&cache);
    let second = cip(p.path(), &["run", "exp.toml"]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(summary(&second), (0, 2, 0), "{}", stdout(&second));
    assert!(tree(&cache) == before, "a cached run changed the cache");
}

fn journal_lines(cache: &Path) -> usize {
    tree(&cache.join("generate"))
        .iter()
        .filter(|(p, _)| p.ends_with("images.journal"))
        .map(|(_, bytes)| bytes.iter().filter(|&&b| b == b'\n').count())
        .sum()
}

#[test]
fn generate_kill_9_mid_node_then_rerun_is_byte_identical() {
    // More steps per image widen the window for the kill to land mid-node.
    let text = experiment(4)
        .replace("batch_size = 2", "batch_size = 1")
        .replace("steps = 3", "steps = 20");
    let reference = project(&text);
    assert!(cip(reference.path(), &["run", "exp.toml"]).status.success());

    let p = project(&text);
    let cache = p.path().join(".cip/cache");
    run_and_kill_9(p.path(), 3, || journal_lines(&cache));
    let journaled = journal_lines(&cache);
    assert!(
        (3..24).contains(&journaled),
        "killed mid-node: {journaled} images journaled"
    );

    let rerun = cip(p.path(), &["run", "exp.toml"]);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    let a = outputs(&reference.path().join(".cip/cache"));
    let b = outputs(&cache);
    assert_eq!(a.len(), 25, "24 images and the manifest");
    assert!(a == b, "resumed output differs from the uninterrupted run");
    // Resumed, not restarted: every image journaled once.
    let journal = tree(&cache.join("generate"))
        .into_iter()
        .find(|(p, _)| p.ends_with("images.journal"))
        .unwrap()
        .1;
    let mut ids: Vec<String> = String::from_utf8_lossy(&journal)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["item"].to_string())
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!((n, ids.len()), (24, 24), "an image was generated twice");
}

fn resolve_error(params: &str) -> String {
    let kind = cip::nodes::lookup("generate").unwrap();
    let table: toml::Table = params.parse().unwrap();
    let error = kind.resolve_params(&table).unwrap_err();
    format!("{}: {}", error.key.unwrap_or_default(), error.message)
}

#[test]
fn generate_params_errors() {
    insta::assert_snapshot!(
        "param_unknown_scheduler",
        resolve_error("scheduler = \"euler_a\"")
    );
    insta::assert_snapshot!("param_zero_steps", resolve_error("steps = 0"));
}

#[test]
fn generate_node_rejects_a_size_the_model_cannot_take() {
    let p = project(&experiment(1).replace("batch_size = 2", "width = 18"));
    let run = cip(p.path(), &["run", "exp.toml"]);
    assert!(!run.status.success());
    let message = stderr(&run);
    assert!(
        message.contains("image size 18x16 is not a multiple of 4"),
        "{message}"
    );
}

#[test]
fn image_seed_depends_on_seed_item_and_index_only() {
    use cip::nodes::generate::image_seed;
    let base = image_seed(7, "n01440764/0001", 0);
    assert_eq!(base, image_seed(7, "n01440764/0001", 0));
    let hash = blake3::hash(
        &[
            &7u64.to_le_bytes()[..],
            b"n01440764/0001",
            &0u64.to_le_bytes(),
        ]
        .concat(),
    );
    assert_eq!(
        base,
        u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap())
    );
    assert_ne!(base, image_seed(8, "n01440764/0001", 0));
    assert_ne!(base, image_seed(7, "n01440764/0002", 0));
    assert_ne!(base, image_seed(7, "n01440764/0001", 1));
}

#[test]
fn cli_generate_equals_the_reference_image() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: cip::nodes::generate::cli::GenerateArgs,
    }
    let case = cases()
        .into_iter()
        .find(|c| c.id == "euler-a-g7.5-neg-s3-wide")
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.png");
    let size = format!("{}x{}", case.width, case.height);
    let steps = case.steps.to_string();
    let seed = case.seed.to_string();
    let guidance = case.guidance.to_string();
    let cli = Cli::try_parse_from([
        "generate",
        "--model",
        model_dir().to_str().unwrap(),
        "--prompt",
        &case.prompt,
        "--negative-prompt",
        case.negative_prompt.as_deref().unwrap(),
        "--seed",
        &seed,
        "--steps",
        &steps,
        "--scheduler",
        &case.scheduler,
        "--guidance",
        &guidance,
        "--size",
        &size,
        "--out",
        out.to_str().unwrap(),
        "--threads",
        "1",
    ])
    .unwrap();
    cip::nodes::generate::cli::run(cli.args).unwrap();
    let ours = image::open(&out).unwrap().to_rgb8();
    let reference = image::open(reference_dir().join(&case.file))
        .unwrap()
        .to_rgb8();
    assert_eq!(ours.dimensions(), reference.dimensions());
    let diff = ours
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .max()
        .unwrap();
    assert!(diff <= MAX_PIXEL_DIFF, "max pixel difference {diff}");
}
