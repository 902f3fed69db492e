//! Greedy and beam-search decoding with transformers' `generate` semantics, written once for both
//! captioners. A captioner implements [`StepModel`] (run the prefix, run one token per row, and
//! duplicate/reorder its rows for beams); everything about choosing tokens lives here.
//!
//! Scores are float32 throughout, as in transformers, so that ties and near-ties resolve the same.

use std::collections::{HashMap, HashSet};

use ort::session::Session;
use ort::value::{DynValue, Tensor};

use crate::runtime::RuntimeError;

/// Why a captioner failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptionModelError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{model}: graph `{graph}` failed: {message}")]
    Graph {
        model: String,
        graph: String,
        message: String,
    },
    #[error("{path}: cannot load the tokenizer: {message}")]
    Tokenizer { path: String, message: String },
    #[error("{model}: {message}")]
    Unsupported { model: String, message: String },
    #[error("pixel_values hold {got} floats, expected {expected} ({batch} images of 3x{height}x{width})")]
    PixelShape {
        got: usize,
        expected: usize,
        batch: usize,
        height: usize,
        width: usize,
    },
}

/// `early_stopping` of transformers' beam search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EarlyStopping {
    /// Stop when no running beam can beat the worst finished one at the current length.
    #[default]
    False,
    /// Stop as soon as every item has `num_beams` finished hypotheses.
    True,
    /// Stop when no running beam can beat the worst finished one even at the maximum length.
    Never,
}

/// The decoding settings of `generate` that cip exposes.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    pub repetition_penalty: f32,
    pub no_repeat_ngram_size: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 16,
            min_new_tokens: 0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
        }
    }
}

/// The ids that end and pad sequences.
#[derive(Debug, Clone)]
pub struct SpecialTokens {
    pub eos: Vec<i64>,
    pub pad: i64,
}

/// A captioner's decoder as the decoding loop drives it. Rows are batch items (times beams).
pub trait StepModel {
    /// Width of the logits.
    fn vocab_size(&self) -> usize;
    /// Repeats every row `times` times in place (row b -> rows b*times..b*times+times-1), before
    /// [`StepModel::prefill`]; transformers expands the inputs this way for beam search.
    fn expand_rows(&mut self, times: usize);
    /// Runs the prefix; returns the logits at the last prefix position, `[rows, vocab]` flat.
    fn prefill(&mut self) -> Result<Vec<f32>, CaptionModelError>;
    /// Feeds one token per row; returns the logits of that position.
    fn step(&mut self, tokens: &[i64]) -> Result<Vec<f32>, CaptionModelError>;
    /// Row i of the state becomes the former row `sources[i]` (beam reordering).
    fn reorder_rows(&mut self, sources: &[usize]);
}

/// What `generate` returned: per row, the prefix followed by the new ids (padded).
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub prefix_len: usize,
    pub output_ids: Vec<Vec<i64>>,
}

impl Generated {
    pub fn new_ids(&self) -> Vec<Vec<i64>> {
        self.output_ids
            .iter()
            .map(|r| r[self.prefix_len..].to_vec())
            .collect()
    }
}

/// Runs greedy search (`num_beams == 1`) or beam search over `model`, whose rows hold `prefix_ids`.
pub fn generate<M: StepModel>(
    model: &mut M,
    prefix_ids: &[Vec<i64>],
    options: &GenerateOptions,
    special: &SpecialTokens,
) -> Result<Generated, CaptionModelError> {
    if options.num_beams <= 1 {
        greedy(model, prefix_ids, options, special)
    } else {
        beam_search(model, prefix_ids, options, special)
    }
}

/// The logits processors transformers builds from these options, applied in its order.
fn process_scores(
    scores: &mut [f32],
    sequence: &[i64],
    new_len: usize,
    options: &GenerateOptions,
    special: &SpecialTokens,
) {
    if options.repetition_penalty != 1.0 {
        let penalty = options.repetition_penalty;
        let seen: HashSet<i64> = sequence.iter().copied().collect();
        for token in seen {
            let s = &mut scores[token as usize];
            *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
        }
    }
    let n = options.no_repeat_ngram_size;
    if n > 0 && sequence.len() + 1 >= n {
        let cur = sequence.len();
        let mut followers: HashMap<&[i64], Vec<i64>> = HashMap::new();
        for start in 0..(cur + 1).saturating_sub(n) {
            let gram = &sequence[start..start + n];
            followers
                .entry(&gram[..n - 1])
                .or_default()
                .push(gram[n - 1]);
        }
        if let Some(banned) = followers.get(&sequence[cur + 1 - n..]) {
            for &t in banned {
                scores[t as usize] = f32::NEG_INFINITY;
            }
        }
    }
    if new_len < options.min_new_tokens {
        for &eos in &special.eos {
            scores[eos as usize] = f32::NEG_INFINITY;
        }
    }
}

fn greedy<M: StepModel>(
    model: &mut M,
    prefix_ids: &[Vec<i64>],
    options: &GenerateOptions,
    special: &SpecialTokens,
) -> Result<Generated, CaptionModelError> {
    let vocab = model.vocab_size();
    let prefix_len = prefix_ids.first().map_or(0, |p| p.len());
    let mut sequences: Vec<Vec<i64>> = prefix_ids.to_vec();
    let mut done = vec![false; sequences.len()];
    let mut logits = model.prefill()?;
    for step in 0..options.max_new_tokens {
        let mut next = Vec::with_capacity(sequences.len());
        for (row, sequence) in sequences.iter_mut().enumerate() {
            let scores = &mut logits[row * vocab..(row + 1) * vocab];
            process_scores(scores, sequence, step, options, special);
            // torch.argmax: the first maximum.
            let mut best = 0;
            for (i, &s) in scores.iter().enumerate() {
                if s > scores[best] {
                    best = i;
                }
            }
            let token = if done[row] { special.pad } else { best as i64 };
            if special.eos.contains(&token) {
                done[row] = true;
            }
            sequence.push(token);
            next.push(token);
        }
        if done.iter().all(|&d| d) || step + 1 == options.max_new_tokens {
            break;
        }
        logits = model.step(&next)?;
    }
    Ok(Generated {
        prefix_len,
        output_ids: sequences,
    })
}

fn log_softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_sum = sum.ln() as f32;
    for x in row.iter_mut() {
        *x = *x - max - log_sum;
    }
}

/// Indices of the `k` largest values, largest first; ties keep the lower index first.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| {
        values[b]
            .partial_cmp(&values[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    order.truncate(k);
    order
}

/// One candidate or hypothesis of an item: the whole sequence so far, its generated length and
/// its score.
#[derive(Debug, Clone)]
struct Beam {
    sequence: Vec<i64>,
    score: f32,
    generated: usize,
    finished: bool,
}

/// transformers 5's vectorised beam search, item by item (see models/README-captioners.md).
fn beam_search<M: StepModel>(
    model: &mut M,
    prefix_ids: &[Vec<i64>],
    options: &GenerateOptions,
    special: &SpecialTokens,
) -> Result<Generated, CaptionModelError> {
    const NEG: f32 = -1.0e9;
    let k = options.num_beams;
    let vocab = model.vocab_size();
    let batch = prefix_ids.len();
    let prefix_len = prefix_ids.first().map_or(0, |p| p.len());
    let max_length = prefix_len + options.max_new_tokens;
    let keep = 2usize.max(1 + special.eos.len()) * k;
    let penalty = options.length_penalty as f64;

    model.expand_rows(k);
    // running[b][j]: beam j of item b; row b*k+j of the model.
    let mut running: Vec<Vec<Beam>> = prefix_ids
        .iter()
        .map(|p| {
            (0..k)
                .map(|j| Beam {
                    sequence: p.clone(),
                    score: if j == 0 { 0.0 } else { NEG },
                    generated: 0,
                    finished: false,
                })
                .collect()
        })
        .collect();
    let mut finished: Vec<Vec<Beam>> = prefix_ids
        .iter()
        .map(|p| {
            (0..k)
                .map(|_| Beam {
                    sequence: p.clone(),
                    score: NEG,
                    generated: 0,
                    finished: false,
                })
                .collect()
        })
        .collect();
    let mut heuristic_unsatisfied = vec![true; batch];
    let mut logits = model.prefill()?;
    let mut cur_len = prefix_len;
    loop {
        let mut sources = Vec::with_capacity(batch * k);
        let mut all_hit = true;
        for b in 0..batch {
            // a. Scores of every continuation of every running beam.
            let mut accumulated = Vec::with_capacity(k * vocab);
            for (j, beam) in running[b].iter().enumerate() {
                let row = b * k + j;
                let scores = &mut logits[row * vocab..(row + 1) * vocab];
                log_softmax(scores);
                process_scores(
                    scores,
                    &beam.sequence,
                    cur_len - prefix_len,
                    options,
                    special,
                );
                accumulated.extend(scores.iter().map(|&s| s + beam.score));
            }
            // b. The best `keep` candidates.
            let candidates: Vec<(Beam, usize, bool)> = top_k(&accumulated, keep)
                .into_iter()
                .map(|index| {
                    let parent = index / vocab;
                    let token = (index % vocab) as i64;
                    let mut sequence = running[b][parent].sequence.clone();
                    sequence.push(token);
                    let hit = special.eos.contains(&token) || cur_len + 1 >= max_length;
                    let beam = Beam {
                        sequence,
                        score: accumulated[index],
                        generated: cur_len + 1 - prefix_len,
                        finished: false,
                    };
                    (beam, b * k + parent, hit)
                })
                .collect();
            all_hit &= candidates.iter().all(|c| c.2);
            // d. The best `k` that did not stop continue.
            let running_scores: Vec<f32> = candidates
                .iter()
                .map(|(beam, _, hit)| beam.score + if *hit { NEG } else { 0.0 })
                .collect();
            let next_running: Vec<Beam> = top_k(&running_scores, k)
                .into_iter()
                .map(|i| {
                    sources.push(candidates[i].1);
                    Beam {
                        score: running_scores[i],
                        ..candidates[i].0.clone()
                    }
                })
                .collect();
            // e. Stopped candidates among the top `k` join the finished hypotheses.
            let full = options.early_stopping == EarlyStopping::True
                && finished[b].iter().all(|h| h.finished);
            let divisor = ((cur_len + 1 - prefix_len) as f64).powf(penalty) as f32;
            let mut merged: Vec<Beam> = finished[b].clone();
            for (i, (beam, _, hit)) in candidates.iter().enumerate() {
                let just_finished = *hit && i < k;
                let mut score = beam.score / divisor;
                if full {
                    score += NEG;
                }
                if !heuristic_unsatisfied[b] {
                    score += NEG;
                }
                if !just_finished {
                    score += NEG;
                }
                let mut sequence = beam.sequence.clone();
                sequence.resize(max_length, special.pad);
                merged.push(Beam {
                    sequence,
                    score,
                    generated: beam.generated,
                    finished: just_finished,
                });
            }
            let merged_scores: Vec<f32> = merged.iter().map(|h| h.score).collect();
            finished[b] = top_k(&merged_scores, k)
                .into_iter()
                .map(|i| merged[i].clone())
                .collect();
            running[b] = next_running;
        }
        cur_len += 1;
        // The early-stopping heuristic, per item.
        for b in 0..batch {
            let length = if options.early_stopping == EarlyStopping::Never && penalty > 0.0 {
                max_length - prefix_len
            } else {
                cur_len - prefix_len
            };
            let best_running = running[b][0].score / ((length as f64).powf(penalty) as f32);
            let worst_finished = finished[b]
                .iter()
                .map(|h| h.score)
                .fold(f32::INFINITY, f32::min);
            let beats = finished[b].iter().any(|h| {
                let worst = if h.finished { worst_finished } else { NEG };
                best_running > worst
            });
            heuristic_unsatisfied[b] &= beats;
        }
        let improvement_possible = heuristic_unsatisfied.iter().any(|&u| u);
        let all_finished = finished.iter().flatten().all(|h| h.finished);
        let open = !(all_finished && options.early_stopping == EarlyStopping::True);
        if !(improvement_possible && open && !all_hit) {
            break;
        }
        model.reorder_rows(&sources);
        let next: Vec<i64> = running
            .iter()
            .flatten()
            .map(|beam| *beam.sequence.last().expect("non-empty"))
            .collect();
        logits = model.step(&next)?;
    }
    let best: Vec<&Beam> = finished.iter().map(|f| &f[0]).collect();
    let longest = best.iter().map(|h| h.generated).max().unwrap_or(0);
    let output_ids = best
        .iter()
        .map(|h| {
            let mut sequence = h.sequence.clone();
            sequence.resize(prefix_len + longest, special.pad);
            sequence
        })
        .collect();
    Ok(Generated {
        prefix_len,
        output_ids,
    })
}

/// A float32 tensor whose first dimension is the row (batch item or beam).
#[derive(Debug, Clone)]
pub struct RowTensor {
    pub shape: Vec<i64>,
    pub data: Vec<f32>,
}

impl RowTensor {
    pub fn empty_cache(rows: usize, heads: usize, head_dim: usize) -> RowTensor {
        RowTensor {
            shape: vec![rows as i64, heads as i64, 0, head_dim as i64],
            data: Vec::new(),
        }
    }

    fn row_len(&self) -> usize {
        self.shape[1..].iter().product::<i64>() as usize
    }

    pub fn row(&self, r: usize) -> &[f32] {
        let n = self.row_len();
        &self.data[r * n..(r + 1) * n]
    }

    pub fn select_rows(&mut self, sources: &[usize]) {
        let n = self.row_len();
        let mut data = Vec::with_capacity(sources.len() * n);
        for &s in sources {
            data.extend_from_slice(&self.data[s * n..(s + 1) * n]);
        }
        self.data = data;
        self.shape[0] = sources.len() as i64;
    }

    pub fn to_value(&self) -> Result<DynValue, ort::Error> {
        Ok(Tensor::from_array((self.shape.clone(), self.data.clone()))?.into_dyn())
    }

    pub fn from_value(value: &DynValue) -> Result<RowTensor, ort::Error> {
        let (shape, data) = value.try_extract_tensor::<f32>()?;
        Ok(RowTensor {
            shape: shape.to_vec(),
            data: data.to_vec(),
        })
    }
}

/// Row indices that repeat every row `times` times.
pub(crate) fn expansion(rows: usize, times: usize) -> Vec<usize> {
    (0..rows)
        .flat_map(|r| std::iter::repeat_n(r, times))
        .collect()
}

/// One self-attention cache tensor. After a decoder run it stays the ONNX Runtime value the graph
/// returned (`Ort`), and goes back in as the next run's input without being copied; it is brought
/// to the host only when rows must be selected (beam search).
#[derive(Debug)]
pub(crate) enum CacheTensor {
    Host(RowTensor),
    Ort(DynValue),
}

impl CacheTensor {
    fn into_value(self) -> Result<DynValue, ort::Error> {
        match self {
            CacheTensor::Host(t) => Ok(Tensor::from_array((t.shape, t.data))?.into_dyn()),
            CacheTensor::Ort(v) => Ok(v),
        }
    }

    fn select_rows(&mut self, sources: &[usize]) -> Result<(), ort::Error> {
        if let CacheTensor::Ort(value) = self {
            *self = CacheTensor::Host(RowTensor::from_value(value)?);
        }
        if let CacheTensor::Host(t) = self {
            t.select_rows(sources);
        }
        Ok(())
    }
}

/// The state both decoder graphs share: attention mask, next positions and the self-attention
/// cache (`past_key_values.<i>.key/.value` in, `present.<i>.key/.value` out).
#[derive(Debug)]
pub(crate) struct DecoderState {
    pub mask: Vec<Vec<i64>>,
    pub next_position: Vec<i64>,
    pub cache: Vec<CacheTensor>,
    /// A cache tensor that could not be brought to the host for row selection; reported by the
    /// next [`DecoderState::run`] (row selection itself cannot fail in the decoding loop's API).
    selection_error: Option<String>,
}

impl DecoderState {
    pub fn new(mask: Vec<Vec<i64>>, layers: usize, heads: usize, head_dim: usize) -> DecoderState {
        let rows = mask.len();
        DecoderState {
            next_position: vec![0; rows],
            mask,
            cache: (0..2 * layers)
                .map(|_| CacheTensor::Host(RowTensor::empty_cache(rows, heads, head_dim)))
                .collect(),
            selection_error: None,
        }
    }

    /// Row i becomes former row `sources[i]`. A cache tensor ONNX Runtime cannot hand back as
    /// float32 means a broken graph; the next [`DecoderState::run`] fails with the reason.
    pub fn select_rows(&mut self, sources: &[usize]) {
        self.mask = sources.iter().map(|&s| self.mask[s].clone()).collect();
        self.next_position = sources.iter().map(|&s| self.next_position[s]).collect();
        for c in &mut self.cache {
            if let Err(e) = c.select_rows(sources) {
                self.selection_error.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// Position ids of the prefix: `cumsum(mask) - 1`, 0 where the mask is 0; records the next.
    pub fn prefix_positions(&mut self) -> Vec<i64> {
        let mut positions = Vec::new();
        for (row, mask) in self.mask.iter().enumerate() {
            let mut sum = 0;
            for &m in mask {
                sum += m;
                positions.push(if m == 0 { 0 } else { sum - 1 });
            }
            self.next_position[row] = sum;
        }
        positions
    }

    /// Position ids of one new token per row; extends the mask.
    pub fn step_positions(&mut self) -> Vec<i64> {
        let positions = self.next_position.clone();
        for (mask, next) in self.mask.iter_mut().zip(&mut self.next_position) {
            mask.push(1);
            *next += 1;
        }
        positions
    }

    /// Runs the decoder graph with `token_input` and any `extra` inputs; keeps `present.*` as the
    /// next cache (as ONNX Runtime values, uncopied) and returns the logits at the last position.
    pub fn run(
        &mut self,
        session: &mut Session,
        model: &str,
        token_input: (&str, DynValue),
        positions: Vec<i64>,
        extra: Vec<(String, DynValue)>,
    ) -> Result<Vec<f32>, CaptionModelError> {
        let graph_error = |e: ort::Error| CaptionModelError::Graph {
            model: model.to_string(),
            graph: "decoder".into(),
            message: e.to_string(),
        };
        let missing = |name: &str| CaptionModelError::Graph {
            model: model.to_string(),
            graph: "decoder".into(),
            message: format!("output `{name}` is missing"),
        };
        if let Some(message) = self.selection_error.take() {
            return Err(CaptionModelError::Graph {
                model: model.to_string(),
                graph: "decoder".into(),
                message: format!("cannot reorder the key/value cache: {message}"),
            });
        }
        let rows = self.mask.len();
        let total = self.mask.first().map_or(0, |m| m.len());
        let sequence = positions.len() / rows.max(1);
        let mask: Vec<i64> = self.mask.iter().flatten().copied().collect();
        let mut inputs: Vec<(String, DynValue)> = vec![
            (token_input.0.to_string(), token_input.1),
            (
                "attention_mask".into(),
                Tensor::from_array((vec![rows as i64, total as i64], mask))
                    .map_err(graph_error)?
                    .into_dyn(),
            ),
            (
                "position_ids".into(),
                Tensor::from_array((vec![rows as i64, sequence as i64], positions))
                    .map_err(graph_error)?
                    .into_dyn(),
            ),
        ];
        let layers = self.cache.len() / 2;
        for (i, c) in std::mem::take(&mut self.cache).into_iter().enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            inputs.push((
                format!("past_key_values.{}.{kind}", i / 2),
                c.into_value().map_err(graph_error)?,
            ));
        }
        inputs.extend(extra);
        let mut outputs = session.run(inputs).map_err(graph_error)?;
        let mut cache = Vec::with_capacity(2 * layers);
        for i in 0..2 * layers {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            let name = format!("present.{}.{kind}", i / 2);
            cache.push(CacheTensor::Ort(
                outputs.remove(&name).ok_or_else(|| missing(&name))?,
            ));
        }
        self.cache = cache;
        let logits = outputs.get("logits").ok_or_else(|| missing("logits"))?;
        let (shape, data) = logits.try_extract_tensor::<f32>().map_err(graph_error)?;
        // Only the last position's logits are needed; copy just those rows out of ORT's buffer.
        let (positions_out, vocab) = (shape[1] as usize, shape[2] as usize);
        let mut last = Vec::with_capacity(rows * vocab);
        for r in 0..rows {
            let at = (r * positions_out + positions_out - 1) * vocab;
            last.extend_from_slice(&data[at..at + vocab]);
        }
        Ok(last)
    }
}
