//! `cip classify --model DIR [--topk K] IMAGE...`: top-k labels and probabilities per image,
//! preprocessed like the eval node (resize to the model's size, its mean/std, bicubic).
//!
//! Labels come from the directory's `classes.txt` (`config.classes_file`, written by the train
//! node); an exported model without one, and outputs past its last line, are labelled `output<i>`.

use std::path::{Path, PathBuf};

use crate::data::augment::{self, AugmentError, Interpolation};
use crate::models::classifier::{forward_logits, ClassifierConfig, ClassifierError};
use crate::runtime::{Family, ModelDir, RuntimeError, SessionConfig};

#[derive(Debug, Clone, clap::Args)]
pub struct ClassifyArgs {
    /// A classifier model directory: a train node's output or an exported classifier.
    #[arg(long)]
    pub model: PathBuf,
    /// How many labels to print per image.
    #[arg(long, default_value_t = 5)]
    pub topk: usize,
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Model(#[from] ClassifierError),
    #[error(transparent)]
    Image(#[from] AugmentError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--topk must be at least 1")]
    TopK,
}

/// One label of an image's top-k.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    pub label: String,
    pub probability: f32,
}

/// Top-k per image, in the order of `args.images`.
pub fn classify_files(args: &ClassifyArgs) -> Result<Vec<Vec<Ranked>>, ClassifyError> {
    if args.topk == 0 {
        return Err(ClassifyError::TopK);
    }
    let dir = ModelDir::open(&args.model, Some(Family::Classifier))?;
    let config: ClassifierConfig = dir.config_as()?;
    let labels = match dir
        .manifest()
        .config
        .get("classes_file")
        .and_then(|v| v.as_str())
    {
        None => Vec::new(),
        Some(file) => {
            let path = dir.path(file);
            std::fs::read_to_string(&path)
                .map_err(|source| ClassifyError::Io { path, source })?
                .lines()
                .map(str::to_string)
                .collect()
        }
    };
    let paths: Vec<&Path> = args.images.iter().map(PathBuf::as_path).collect();
    let batch = augment::eval_batch(
        &paths,
        config.image_size,
        Interpolation::Bicubic,
        config.mean,
        config.std,
    )?;
    let mut session = dir.session("forward", &SessionConfig::default())?;
    let logits = forward_logits(&mut session, dir.root(), batch.view())?;
    Ok(logits
        .rows()
        .into_iter()
        .map(|row| {
            // Ranked and scored as the eval node does.
            super::ranked_outputs(row, None)
                .into_iter()
                .take(args.topk)
                .map(|i| Ranked {
                    label: labels
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| format!("output{i}")),
                    probability: super::membership::true_label_confidence(row, i, None),
                })
                .collect()
        })
        .collect())
}

/// The printed form: the image path, then one `rank. label probability` line per label.
pub fn format(images: &[PathBuf], ranked: &[Vec<Ranked>]) -> String {
    let mut text = String::new();
    for (image, top) in images.iter().zip(ranked) {
        text.push_str(&format!("{}\n", image.display()));
        for (rank, r) in top.iter().enumerate() {
            text.push_str(&format!(
                "  {}. {}  {:.4}\n",
                rank + 1,
                r.label,
                r.probability
            ));
        }
    }
    text
}

pub fn run(args: &ClassifyArgs) -> Result<(), ClassifyError> {
    let ranked = classify_files(args)?;
    print!("{}", format(&args.images, &ranked));
    Ok(())
}
