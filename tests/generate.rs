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
