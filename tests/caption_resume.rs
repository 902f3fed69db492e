//! The caption node survives `kill -9`: a rerun resumes from its journal and writes the same
//! captions file, byte for byte, as a run that was never interrupted.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blip2-tiny")
}

/// 24 drawn images in 3 classes and a caption node that journals every image.
fn project() -> tempfile::TempDir {
    let p = tempfile::tempdir().unwrap();
    for i in 0..24u32 {
        let class = ["cat", "dog", "fox"][(i % 3) as usize];
        let img = image::RgbImage::from_fn(32 + i, 28, |x, y| {
            let v = x * 29 + y * 13 + i * 71;
            image::Rgb([
                (v % 251) as u8,
                ((v / 5) % 256) as u8,
                ((v * 3) % 241) as u8,
            ])
        });
        let path = p.path().join(format!("data/train/{class}/img{i:02}.png"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        img.save(path).unwrap();
    }
    let text = format!(
        r#"
[experiment]
name = "caption-resume"

[datasets.tiny]
root = "data"
splits = ["train"]

[models.captioner]
path = "{}"
family = "blip2"

[nodes.captions]
kind = "caption"
images = "tiny.train"
model = "captioner"
max_new_tokens = 16
min_new_tokens = 16
num_beams = 3
batch_size = 1
"#,
        model().display()
    );
    std::fs::write(p.path().join("exp.toml"), text).unwrap();
    p
}

fn journaled(cache: &Path) -> usize {
    tree(&cache.join("caption"))
        .iter()
        .filter(|(p, _)| p.ends_with(".journal"))
        .map(|(_, bytes)| bytes.iter().filter(|&&b| b == b'\n').count())
        .sum()
}

fn captions_file(cache: &Path) -> Vec<u8> {
    let entries = entries(cache, "caption");
    assert_eq!(entries.len(), 1, "{entries:?}");
    std::fs::read(entries[0].join("captions.csv")).unwrap()
}

#[test]
fn caption_kill_9_mid_node_then_rerun_is_byte_identical() {
    let reference = project();
    let out = cip(reference.path(), &["run", "exp.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = captions_file(&reference.path().join(".cip/cache"));
    assert_eq!(
        String::from_utf8_lossy(&expected).lines().count(),
        25,
        "a header and 24 captions"
    );

    let p = project();
    let cache = p.path().join(".cip/cache");
    run_and_kill_9(p.path(), 3, || journaled(&cache));
    let done = journaled(&cache);
    assert!((3..24).contains(&done), "killed mid-node: {done} journaled");
    assert!(
        entries(&cache, "caption").is_empty(),
        "the entry must still be partial"
    );

    let rerun = cip(p.path(), &["run", "exp.toml"]);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    assert_eq!(summary(&rerun), (1, 0, 0));
    assert!(
        captions_file(&cache) == expected,
        "resumed captions differ from the uninterrupted run"
    );
    // Resumed, not restarted: each image was captioned (journaled) once.
    let mut ids: Vec<String> = tree(&cache.join("caption"))
        .iter()
        .filter(|(p, _)| p.ends_with(".journal"))
        .flat_map(|(_, bytes)| {
            String::from_utf8_lossy(bytes)
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["item"].to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!((n, ids.len()), (24, 24), "an image was captioned twice");
}
