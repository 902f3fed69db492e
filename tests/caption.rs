//! Captioners: token-id parity with transformers' `generate` on the tiny fixtures (reference ids
//! committed by models/cip_export/{blip2,vit_gpt2}.py), and the `caption` node.

mod common;

use std::path::{Path, PathBuf};

use cip::models::blip2::Blip2;
use cip::models::decoding::{EarlyStopping, GenerateOptions};
use cip::models::vit_gpt2::VitGpt2;
use cip::runtime::SessionConfig;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cpu() -> SessionConfig {
    SessionConfig {
        intra_threads: Some(1),
        ..SessionConfig::default()
    }
}

fn reference(name: &str) -> (Value, Vec<u8>) {
    let dir = fixtures().join("reference").join(name);
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let tensors = std::fs::read(dir.join("inputs.safetensors")).unwrap();
    (index, tensors)
}

fn tensor(bytes: &[u8], name: &str) -> Vec<f32> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn options(kwargs: &Value) -> GenerateOptions {
    let get = |k: &str| kwargs.get(k);
    GenerateOptions {
        max_new_tokens: get("max_new_tokens").unwrap().as_u64().unwrap() as usize,
        num_beams: get("num_beams").map_or(1, |v| v.as_u64().unwrap() as usize),
        min_new_tokens: get("min_new_tokens").map_or(0, |v| v.as_u64().unwrap() as usize),
        repetition_penalty: get("repetition_penalty").map_or(1.0, |v| v.as_f64().unwrap() as f32),
        no_repeat_ngram_size: get("no_repeat_ngram_size")
            .map_or(0, |v| v.as_u64().unwrap() as usize),
        length_penalty: get("length_penalty").map_or(1.0, |v| v.as_f64().unwrap() as f32),
        early_stopping: match get("early_stopping") {
            Some(Value::Bool(true)) => EarlyStopping::True,
            Some(Value::String(s)) if s == "never" => EarlyStopping::Never,
            _ => EarlyStopping::False,
        },
    }
}

fn ids(v: &Value) -> Vec<Vec<i64>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn prompts(case: &Value) -> Option<Vec<String>> {
    serde_json::from_value(case["prompts"].clone()).unwrap()
}

#[test]
fn blip2_generate_matches_transformers_on_every_reference_case() {
    let (index, tensors) = reference("blip2");
    let mut model = Blip2::open(&fixtures().join("blip2-tiny"), &cpu()).unwrap();
    let mut mismatches = Vec::new();
    for case in index["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let pixels = tensor(&tensors, case["pixel_values"].as_str().unwrap());
        let batch = case["images"].as_array().unwrap().len();
        let prompts = prompts(case);
        let (prefix, mask) = model.prefix(batch, prompts.as_deref()).unwrap();
        assert_eq!(prefix, ids(&case["prefix_ids"]), "{name}: prefix ids");
        assert_eq!(mask, ids(&case["prefix_attention_mask"]), "{name}: mask");
        let generated = model
            .generate(
                &pixels,
                batch,
                prompts.as_deref(),
                &options(&case["generate_kwargs"]),
            )
            .unwrap();
        let captions = model.captions(&generated).unwrap();
        let expected: Vec<String> = serde_json::from_value(case["captions"].clone()).unwrap();
        if generated.output_ids != ids(&case["output_ids"]) || captions != expected {
            mismatches.push(format!(
                "{name}:\n  got      {:?}\n  expected {:?}",
                generated.output_ids, case["output_ids"]
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn vit_gpt2_generate_matches_transformers_on_every_reference_case() {
    let (index, tensors) = reference("vit-gpt2");
    let mut model = VitGpt2::open(&fixtures().join("vit-gpt2-tiny"), &cpu()).unwrap();
    let mut mismatches = Vec::new();
    for case in index["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let pixels = tensor(&tensors, case["pixel_values"].as_str().unwrap());
        let batch = case["images"].as_array().unwrap().len();
        let prompts = prompts(case);
        let prompt = prompts.as_ref().map(|p| p[0].as_str());
        let prefix = model.prefix(batch, prompt).unwrap();
        assert_eq!(prefix, ids(&case["prefix_ids"]), "{name}: prefix ids");
        let generated = model
            .generate(&pixels, batch, prompt, &options(&case["generate_kwargs"]))
            .unwrap();
        let captions = model.captions(&generated).unwrap();
        let expected: Vec<String> = serde_json::from_value(case["captions"].clone()).unwrap();
        if generated.output_ids != ids(&case["output_ids"]) || captions != expected {
            mismatches.push(format!(
                "{name}:\n  got      {:?}\n  expected {:?}",
                generated.output_ids, case["output_ids"]
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

fn image_settings(model: &str) -> cip::models::preprocess::ImageSettings {
    cip::runtime::ModelDir::open(&fixtures().join(model), None)
        .unwrap()
        .config_as()
        .unwrap()
}

/// RGB conversion and `pixel_values` against transformers' processors (torchvision backend, the
/// transformers 5 default). The RGB bytes must match exactly; the pixel values may differ by one
/// uint8 rounding step of the resize at a few pixels (measured figures are printed).
#[test]
fn preprocessing_matches_transformers_processors() {
    use cip::models::preprocess::{load_rgb, pixel_values};
    let dir = fixtures().join("reference/preprocess");
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("pixel_values.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for image in index["images"].as_array().unwrap() {
        let name = image["name"].as_str().unwrap();
        let file = dir.join(image["file"].as_str().unwrap());
        for (conversion, tensor) in [
            ("transformers_convert_to_rgb", format!("{name}.rgb")),
            ("pillow_convert_rgb", format!("{name}.model_card_rgb")),
        ] {
            let rgb = load_rgb(&file, conversion).unwrap();
            let expected = st.tensor(&tensor).unwrap().data().to_vec();
            let differing = rgb
                .data
                .iter()
                .zip(&expected)
                .filter(|(a, b)| a != b)
                .count();
            let max = rgb
                .data
                .iter()
                .zip(&expected)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            report.push(format!(
                "{tensor}: {differing} bytes differ, by at most {max}"
            ));
            // JPEG decoders (libjpeg in Pillow, zune-jpeg here) are not bit-exact; PNG must be.
            let jpeg = file.extension().is_some_and(|e| e == "jpg");
            let allowed = if jpeg { 2 } else { 0 };
            if max > allowed || rgb.data.len() != expected.len() {
                failures.push(format!(
                    "{tensor}: {differing} of {} bytes differ",
                    expected.len()
                ));
            }
        }
    }
    for output in index["outputs"].as_array().unwrap() {
        if output["backend"] != "torchvision" || output.get("error").is_some() {
            continue;
        }
        let (processor, variant) = (
            output["processor"].as_str().unwrap(),
            output["variant"].as_str().unwrap(),
        );
        let (model, conversion) = match (processor, variant) {
            ("blip2", _) => ("blip2-tiny", "transformers_convert_to_rgb"),
            (_, _) => ("vit-gpt2-tiny", "pillow_convert_rgb"),
        };
        let settings = image_settings(model);
        assert_eq!(settings.rgb_conversion, conversion);
        let image = output["image"].as_str().unwrap();
        let file = index["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == image)
            .unwrap()["file"]
            .as_str()
            .unwrap();
        let rgb = load_rgb(&dir.join(file), conversion).unwrap();
        let got = pixel_values(&rgb, &settings).unwrap();
        let tensor = output["tensor"].as_str().unwrap();
        let expected: Vec<f32> = st
            .tensor(tensor)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // One uint8 step after normalisation, per channel.
        let step = 1.0
            / (255.0
                * settings
                    .image_std
                    .iter()
                    .cloned()
                    .fold(f64::INFINITY, f64::min)) as f32;
        let diffs: Vec<f32> = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .collect();
        let max = diffs.iter().cloned().fold(0.0, f32::max);
        let off = diffs.iter().filter(|&&d| d > 1e-5).count();
        report.push(format!(
            "{tensor}: max diff {max:.3e}, {off} of {} values off",
            diffs.len()
        ));
        if max > step * 1.01 {
            failures.push(format!(
                "{tensor}: max diff {max} exceeds one uint8 step ({step})"
            ));
        }
    }
    println!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{}\n\n{}",
        failures.join("\n"),
        report.join("\n")
    );
}
