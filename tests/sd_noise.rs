//! `TorchGenerator` against `torch.randn` outputs recorded by
//! `models/cip_export/noise_schedulers.py` (tests/fixtures/reference/noise/): bit for bit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cip::models::sd::noise::TorchGenerator;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/noise")
}

#[derive(Deserialize)]
struct Index {
    tensors: String,
    cases: Vec<Case>,
    sequences: Vec<Sequence>,
}

#[derive(Deserialize)]
struct Case {
    seed: u64,
    shape: Vec<usize>,
    key: String,
}

#[derive(Deserialize)]
struct Sequence {
    name: String,
    seed: u64,
    draws: Vec<Draw>,
}

#[derive(Deserialize)]
struct Draw {
    shape: Vec<usize>,
    key: String,
}

struct Reference {
    index: Index,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

fn load() -> Reference {
    let dir = fixture_dir();
    let index: Index =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join(&index.tensors)).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect();
    Reference { index, tensors }
}

/// Index and values of the first element whose bits differ, and how many differ.
fn compare_bits(ours: &[f32], torch: &[f32]) -> Option<(usize, f32, f32, usize)> {
    assert_eq!(ours.len(), torch.len());
    let differing: Vec<usize> = (0..ours.len())
        .filter(|&i| ours[i].to_bits() != torch[i].to_bits())
        .collect();
    differing
        .first()
        .map(|&i| (i, ours[i], torch[i], differing.len()))
}

#[test]
fn randn_equals_torch_bit_for_bit() {
    let reference = load();
    assert!(reference.index.cases.len() >= 30);
    let mut elements = 0;
    for case in &reference.index.cases {
        let (shape, expected) = &reference.tensors[&case.key];
        assert_eq!(shape, &case.shape, "{}", case.key);
        let mut generator = TorchGenerator::new(case.seed);
        assert_eq!(generator.initial_seed(), case.seed);
        let ours = generator.randn(&case.shape);
        if let Some((i, a, b, n)) = compare_bits(&ours, expected) {
            panic!(
                "{}: {n} values differ from torch; first at {i}: ours {a:e}, torch {b:e}",
                case.key
            );
        }
        elements += ours.len();
    }
    println!(
        "{} cases, {elements} values equal torch.randn bit for bit",
        reference.index.cases.len()
    );
}

#[test]
fn consecutive_draws_continue_the_stream_like_torch() {
    let reference = load();
    assert!(!reference.index.sequences.is_empty());
    for sequence in &reference.index.sequences {
        let mut generator = TorchGenerator::new(sequence.seed);
        for (i, draw) in sequence.draws.iter().enumerate() {
            let (_, expected) = &reference.tensors[&draw.key];
            let ours = generator.randn(&draw.shape);
            if let Some((j, a, b, n)) = compare_bits(&ours, expected) {
                panic!(
                    "{} draw {i} {:?}: {n} values differ; first at {j}: ours {a:e}, torch {b:e}",
                    sequence.name, draw.shape
                );
            }
        }
    }
}

#[test]
fn fill_randn_matches_randn_for_any_shape_with_the_same_count() {
    // torch draws by element count only; [5, 3] and [15] are the same draw.
    let reference = load();
    let case = reference
        .index
        .cases
        .iter()
        .find(|c| c.shape == [5, 3])
        .expect("a [5, 3] case");
    let mut flat = vec![0.0f32; 15];
    TorchGenerator::new(case.seed).fill_randn(&mut flat);
    assert_eq!(flat, reference.tensors[&case.key].1);
}
