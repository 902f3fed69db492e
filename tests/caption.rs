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

// ---------------------------------------------------------------------------------------------
// The `caption` node through the real binary.

fn write_png(path: &Path, width: u32, height: u32, seed: u32) {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        let v = x * 31 + y * 17 + seed * 59;
        image::Rgb([
            (v % 256) as u8,
            ((v / 3) % 256) as u8,
            ((v * 7) % 256) as u8,
        ])
    });
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image.save(path).unwrap();
}

/// A project with a 2-class ImageFolder split and a caption node over `model_dir` (family given).
fn caption_project(model_dir: &Path, family: &str, extra: &str) -> tempfile::TempDir {
    let p = tempfile::tempdir().unwrap();
    for (i, name) in ["cat/a.png", "cat/b.png", "dog/c.png"].iter().enumerate() {
        write_png(
            &p.path().join("data/train").join(name),
            40 + 8 * i as u32,
            30,
            i as u32,
        );
    }
    let text = format!(
        r#"
[experiment]
name = "cap"

[datasets.tiny]
root = "data"
splits = ["train"]

[models.captioner]
path = "{}"
family = "{family}"

[nodes.captions]
kind = "caption"
images = "tiny.train"
model = "captioner"
max_new_tokens = 8
batch_size = 2
{extra}
"#,
        model_dir.display()
    );
    std::fs::write(p.path().join("exp.toml"), text).unwrap();
    p
}

/// Runs `cip` with the test process's ONNX Runtime library (found from the crate root, where
/// the .venv lives), since the project directory is a temp dir.
fn cip_run(dir: &Path, args: &[&str]) -> std::process::Output {
    let library = cip::runtime::find_library().expect("ONNX Runtime library for the tests");
    std::process::Command::new(common::cip_bin())
        .args(args)
        .current_dir(dir)
        .env_remove("CIP_CACHE")
        .env("NO_COLOR", "1")
        .env("ORT_DYLIB_PATH", std::path::absolute(library).unwrap())
        .output()
        .expect("cip runs")
}

fn find_file(root: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(root).ok()?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

#[cfg(feature = "test-kinds")]
#[test]
fn caption_node_captions_every_image_and_caches() {
    for (model, family) in [("blip2-tiny", "blip2"), ("vit-gpt2-tiny", "vit-gpt2")] {
        let p = caption_project(&fixtures().join(model), family, "num_beams = 2");
        let first = cip_run(p.path(), &["run", "exp.toml"]);
        assert!(first.status.success(), "{}", common::stderr(&first));
        assert_eq!(common::summary(&first), (1, 0, 0));
        let csv = find_file(p.path(), "captions.csv").expect("captions.csv in the cache");
        let text = std::fs::read_to_string(&csv).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("id,class,caption,tokens"));
        let rows: Vec<&str> = lines.collect();
        assert_eq!(rows.len(), 3, "{text}");
        assert!(
            rows[0].starts_with("cat/a,cat,") && rows[2].starts_with("dog/c,dog,"),
            "{text}"
        );

        // The captions are what the library API gives for the same images and settings.
        let mut captioner =
            cip::nodes::caption::Captioner::open(family, &fixtures().join(model), &cpu()).unwrap();
        let settings = captioner.image_settings().clone();
        let mut pixels = Vec::new();
        for name in ["cat/a.png", "cat/b.png"] {
            let rgb = cip::models::preprocess::load_rgb(
                &p.path().join("data/train").join(name),
                &settings.rgb_conversion,
            )
            .unwrap();
            pixels.extend(cip::models::preprocess::pixel_values(&rgb, &settings).unwrap());
        }
        let options = GenerateOptions {
            max_new_tokens: 8,
            num_beams: 2,
            ..GenerateOptions::default()
        };
        let expected = captioner.caption(&pixels, 2, None, &options).unwrap();
        let mut reader = csv::Reader::from_path(&csv).unwrap();
        let records: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        for (record, want) in records.iter().zip(&expected) {
            assert_eq!(&record[2], want.caption, "{family}");
            assert_eq!(record[3].parse::<usize>().unwrap(), want.tokens, "{family}");
        }

        let second = cip_run(p.path(), &["run", "exp.toml"]);
        assert_eq!(common::summary(&second), (0, 1, 0), "{family}");
    }
}

#[cfg(feature = "test-kinds")]
#[test]
fn caption_node_skips_unreadable_images_when_told() {
    let p = caption_project(
        &fixtures().join("blip2-tiny"),
        "blip2",
        "on_error = \"skip\"",
    );
    std::fs::write(p.path().join("data/train/dog/broken.png"), b"not an image").unwrap();
    let run = cip_run(p.path(), &["run", "exp.toml"]);
    assert!(run.status.success(), "{}", common::stderr(&run));
    let csv = find_file(p.path(), "captions.csv").unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(
        text.lines().count(),
        4,
        "3 captions and the header:\n{text}"
    );
    assert!(!text.contains("broken"), "{text}");
}

/// The error output of a failing run, with temp and fixture paths made stable.
fn failure(p: &tempfile::TempDir) -> String {
    let run = cip_run(p.path(), &["run", "exp.toml"]);
    assert!(
        !run.status.success(),
        "the run must fail:\n{}",
        common::stdout(&run)
    );
    let text = format!("{}{}", common::stdout(&run), common::stderr(&run));
    let tmp = p.path().display().to_string();
    let tmp_canonical = p.path().canonicalize().unwrap().display().to_string();
    text.replace(&tmp_canonical, "[PROJECT]")
        .replace(&tmp, "[PROJECT]")
        .replace(&fixtures().display().to_string(), "[FIXTURES]")
        .lines()
        // The final `error:` line; the log lines before it carry the node key.
        .filter(|l| l.starts_with("error"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(feature = "test-kinds")]
#[test]
fn caption_node_errors() {
    let blip = fixtures().join("blip2-tiny");
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, PathBuf, &str)> = vec![
        (
            "not_an_image",
            Box::new(|root: &Path| {
                std::fs::write(
                    root.join("data/train/dog/notes.png"),
                    b"plain text, not a PNG",
                )
                .unwrap()
            }),
            blip.clone(),
            "blip2",
        ),
        (
            "truncated_jpeg",
            Box::new(|root: &Path| {
                let path = root.join("data/train/dog/cut.jpg");
                image::RgbImage::from_pixel(24, 24, image::Rgb([200, 10, 10]))
                    .save(&path)
                    .unwrap();
                let bytes = std::fs::read(&path).unwrap();
                std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
            }),
            blip.clone(),
            "blip2",
        ),
        (
            "zero_byte_file",
            Box::new(|root: &Path| {
                std::fs::write(root.join("data/train/cat/empty.png"), b"").unwrap()
            }),
            blip.clone(),
            "blip2",
        ),
        (
            "no_classes",
            Box::new(|root: &Path| {
                std::fs::remove_dir_all(root.join("data/train")).unwrap();
                write_png(&root.join("data/train/loose.png"), 8, 8, 0);
            }),
            blip.clone(),
            "blip2",
        ),
        (
            "wrong_model_family",
            Box::new(|_: &Path| {}),
            fixtures().join("vit-gpt2-tiny"),
            "blip2",
        ),
    ];
    for (name, damage, model, family) in cases {
        let p = caption_project(&model, family, "");
        damage(p.path());
        insta::assert_snapshot!(format!("caption_error_{name}"), failure(&p));
    }
}

#[test]
fn caption_command_captions_files_like_the_node() {
    use cip::nodes::caption::cli::{caption_files, CaptionArgs};
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<PathBuf> = (0..2)
        .map(|i| {
            let path = dir.path().join(format!("img{i}.png"));
            write_png(&path, 36 + 10 * i, 28, i);
            path
        })
        .collect();
    let model = fixtures().join("vit-gpt2-tiny");
    let args = CaptionArgs {
        model: model.clone(),
        max_new_tokens: 6,
        beams: 3,
        prompt: Some("a photo of".into()),
        provider: "cpu".into(),
        json: true,
        images: images.clone(),
    };
    let got = caption_files(&args).unwrap();
    let mut captioner = cip::nodes::caption::Captioner::open("vit-gpt2", &model, &cpu()).unwrap();
    let settings = captioner.image_settings().clone();
    let mut pixels = Vec::new();
    for image in &images {
        let rgb = cip::models::preprocess::load_rgb(image, &settings.rgb_conversion).unwrap();
        pixels.extend(cip::models::preprocess::pixel_values(&rgb, &settings).unwrap());
    }
    let options = GenerateOptions {
        max_new_tokens: 6,
        num_beams: 3,
        ..GenerateOptions::default()
    };
    let want = captioner
        .caption(&pixels, 2, Some("a photo of"), &options)
        .unwrap();
    assert_eq!(got.len(), 2);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            (g.caption.as_str(), g.tokens),
            (w.caption.as_str(), w.tokens)
        );
    }

    let wrong = CaptionArgs {
        model: fixtures().join("resnet-tiny"),
        ..args
    };
    let error = caption_files(&wrong)
        .expect_err("a classifier cannot caption")
        .to_string();
    assert!(
        error.contains("captioning needs family blip2 or vit-gpt2"),
        "{error}"
    );
}
