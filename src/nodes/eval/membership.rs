//! The membership-inference attack of the paper's code: a threshold on the softmax confidence of
//! the true label. Members (images the classifier trained on) tend to get higher confidence than
//! non-members (held-out test images); the attack says "member" when confidence >= threshold and
//! is scored by balanced accuracy (mean of the member and non-member hit rates), best over every
//! threshold. 50% means the classifier leaks nothing this attack can see.

use std::path::Path;

use ndarray::ArrayView1;
use ort::session::Session;

use super::super::train::LabelledImage;
use super::super::NodeError;
use crate::data::augment::{self, EvalResize, Interpolation};
use crate::data::table::write_csv;
use crate::models::classifier::{forward_logits, ClassifierConfig};

/// The best threshold of the attack and how well it separates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttackResult {
    /// Mean of the true-positive rate on members and the true-negative rate on non-members, 0..=1.
    pub balanced_accuracy: f64,
    /// "Member" when confidence >= threshold. `f32::INFINITY` when calling nothing a member is
    /// best (every finite threshold does no better than 0.5).
    pub threshold: f32,
}

/// Softmax probability of `truth` among the competing outputs (`allowed`, or all).
pub fn true_label_confidence(
    logits: ArrayView1<'_, f32>,
    truth: usize,
    allowed: Option<&[bool]>,
) -> f32 {
    let competing = |i: usize| allowed.is_none_or(|a| a[i]);
    let max = logits
        .iter()
        .enumerate()
        .filter(|(i, _)| competing(*i))
        .fold(f64::NEG_INFINITY, |m, (_, &v)| m.max(v as f64));
    // f64 and max-shift: confidences near 1 must not round to exactly 1 for every member.
    let sum: f64 = logits
        .iter()
        .enumerate()
        .filter(|(i, _)| competing(*i))
        .map(|(_, &v)| (v as f64 - max).exp())
        .sum();
    if !competing(truth) {
        return 0.0;
    }
    ((logits[truth] as f64 - max).exp() / sum) as f32
}

/// The best balanced accuracy over all thresholds. Candidate thresholds are the observed scores
/// (plus +inf); ties in balanced accuracy keep the highest threshold. `None` when either side is
/// empty (the rates are undefined).
pub fn best_threshold(members: &[f32], nonmembers: &[f32]) -> Option<AttackResult> {
    if members.is_empty() || nonmembers.is_empty() {
        return None;
    }
    // (score, is_member), descending by score: lowering the threshold past a group of equal
    // scores flips that whole group to "member".
    let mut all: Vec<(f32, bool)> = members
        .iter()
        .map(|&s| (s, true))
        .chain(nonmembers.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (m, n) = (members.len() as f64, nonmembers.len() as f64);
    let mut best = AttackResult {
        balanced_accuracy: 0.5,
        threshold: f32::INFINITY,
    };
    let (mut true_pos, mut false_pos) = (0usize, 0usize);
    let mut i = 0;
    while i < all.len() {
        let threshold = all[i].0;
        while i < all.len() && all[i].0 == threshold {
            if all[i].1 {
                true_pos += 1;
            } else {
                false_pos += 1;
            }
            i += 1;
        }
        let balanced = 0.5 * (true_pos as f64 / m + (n - false_pos as f64) / n);
        if balanced > best.balanced_accuracy {
            best = AttackResult {
                balanced_accuracy: balanced,
                threshold,
            };
        }
    }
    Some(best)
}

/// True-label confidences of `images` (each class must be in `index_of`), in order.
#[allow(clippy::too_many_arguments)]
pub fn score_images(
    session: &mut Session,
    dir: &Path,
    config: &ClassifierConfig,
    (interpolation, resize): (Interpolation, EvalResize),
    batch_size: usize,
    images: &[&LabelledImage],
    index_of: &std::collections::HashMap<&str, usize>,
    allowed: Option<&[bool]>,
) -> Result<Vec<f32>, NodeError> {
    let mut scores = Vec::with_capacity(images.len());
    for chunk in images.chunks(batch_size.max(1)) {
        let paths: Vec<&Path> = chunk.iter().map(|i| i.path.as_path()).collect();
        let batch = augment::eval_batch_with(
            &paths,
            config.image_size,
            interpolation,
            resize,
            config.mean,
            config.std,
        )
        .map_err(|e| NodeError::Failed(e.to_string()))?;
        let logits = forward_logits(session, dir, batch.view())
            .map_err(|e| NodeError::Failed(e.to_string()))?;
        for (item, row) in chunk.iter().zip(logits.rows()) {
            scores.push(true_label_confidence(
                row,
                index_of[item.class.as_str()],
                allowed,
            ));
        }
    }
    Ok(scores)
}

/// Runs the attack and writes `membership.csv` (the result) and `membership_scores.csv` (every
/// confidence: members in their manifest order, then non-members in scoring order). Returns the
/// `membership` object of metrics.json: balanced accuracy in percent like top-1, threshold null
/// when it is +inf.
pub fn record(
    out: &Path,
    members_set: &str,
    nonmembers_set: &str,
    members: &[f32],
    nonmembers: &[f32],
) -> Result<serde_json::Value, NodeError> {
    let result = best_threshold(members, nonmembers).ok_or_else(|| {
        NodeError::Failed(format!(
            "membership attack: {} member images ({members_set}) and {} non-member images ({nonmembers_set}) with classes the classifier knows; both must be non-empty",
            members.len(),
            nonmembers.len()
        ))
    })?;
    let csv_error = |e: crate::data::DataError| NodeError::Failed(e.to_string());
    let percent = 100.0 * result.balanced_accuracy;
    write_csv(
        &out.join("membership.csv"),
        &[
            "members",
            "nonmembers",
            "n_members",
            "n_nonmembers",
            "balanced_accuracy",
            "threshold",
        ],
        [[
            members_set.to_string(),
            nonmembers_set.to_string(),
            members.len().to_string(),
            nonmembers.len().to_string(),
            percent.to_string(),
            result.threshold.to_string(),
        ]],
    )
    .map_err(csv_error)?;
    let rows = members
        .iter()
        .map(|s| ["member".to_string(), s.to_string()])
        .chain(
            nonmembers
                .iter()
                .map(|s| ["nonmember".to_string(), s.to_string()]),
        );
    write_csv(
        &out.join("membership_scores.csv"),
        &["role", "confidence"],
        rows,
    )
    .map_err(csv_error)?;
    Ok(serde_json::json!({
        "members": members_set,
        "n_members": members.len(),
        "n_nonmembers": nonmembers.len(),
        "balanced_accuracy": percent,
        "threshold": result.threshold.is_finite().then_some(result.threshold),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_is_the_softmax_of_the_true_label() {
        // softmax([0, ln 3]) = [1/4, 3/4].
        let logits = ndarray::arr1(&[0.0f32, 3f32.ln()]);
        assert!((true_label_confidence(logits.view(), 1, None) - 0.75).abs() < 1e-6);
        assert!((true_label_confidence(logits.view(), 0, None) - 0.25).abs() < 1e-6);
        // A mask drops output 2 from the softmax: the big logit no longer competes.
        let logits = ndarray::arr1(&[0.0f32, 3f32.ln(), 50.0]);
        let allowed = [true, true, false];
        assert!((true_label_confidence(logits.view(), 1, Some(&allowed)) - 0.75).abs() < 1e-6);
        assert!(true_label_confidence(logits.view(), 1, None) < 1e-6);
    }

    #[test]
    fn best_threshold_by_hand() {
        // Members 0.9 0.8 0.4, non-members 0.7 0.3 0.2. Thresholds (member if >= t):
        //   0.9: TPR 1/3, TNR 3/3 -> 2/3
        //   0.8: TPR 2/3, TNR 3/3 -> 5/6   <- best, highest of the tie
        //   0.7: TPR 2/3, TNR 2/3 -> 2/3
        //   0.4: TPR 3/3, TNR 2/3 -> 5/6
        //   0.3 and 0.2: lower.
        let r = best_threshold(&[0.9, 0.8, 0.4], &[0.7, 0.3, 0.2]).unwrap();
        assert!((r.balanced_accuracy - 5.0 / 6.0).abs() < 1e-12, "{r:?}");
        assert_eq!(r.threshold, 0.8);
    }

    #[test]
    fn separable_scores_reach_one_and_equal_scores_stay_at_chance() {
        let r = best_threshold(&[0.9, 0.95], &[0.1, 0.2, 0.3]).unwrap();
        assert_eq!(r.balanced_accuracy, 1.0);
        assert_eq!(r.threshold, 0.9);
        let r = best_threshold(&[0.5, 0.5], &[0.5]).unwrap();
        assert_eq!(r.balanced_accuracy, 0.5);
        assert_eq!(r.threshold, f32::INFINITY);
        // Members less confident than non-members: no threshold of this attack helps.
        let r = best_threshold(&[0.1], &[0.9]).unwrap();
        assert_eq!(r.balanced_accuracy, 0.5);
        assert!(best_threshold(&[], &[0.3]).is_none());
    }
}
