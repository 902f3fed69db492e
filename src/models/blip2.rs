//! BLIP-2 (OPT) on ONNX Runtime: `vision` (encoder + Q-Former + projection), `embed` (token
//! embeddings) and `decoder` graphs, driven by [`crate::models::decoding`]. The prefix recipe is
//! transformers' `Blip2ForConditionalGeneration.generate` (models/README-captioners.md).

use std::path::Path;

use ort::session::Session;
use ort::value::{DynValue, Tensor};
use serde::Deserialize;
use tokenizers::Tokenizer;

use super::decoding::{
    expansion, generate, CaptionModelError, DecoderState, GenerateOptions, Generated, RowTensor,
    SpecialTokens, StepModel,
};
use super::preprocess::ImageSettings;
use crate::runtime::{Family, ModelDir, SessionConfig};

/// One id (or mask) sequence per row.
pub type TokenRows = Vec<Vec<i64>>;

/// The `[config]` keys of a `blip2` model directory that decoding needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Blip2Config {
    pub num_query_tokens: usize,
    pub image_token_index: i64,
    pub bos_token_id: i64,
    pub eos_token_id: Vec<i64>,
    pub pad_token_id: i64,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub prompt_padding_side: String,
}

/// An opened BLIP-2 model directory.
pub struct Blip2 {
    name: String,
    pub config: Blip2Config,
    pub image: ImageSettings,
    tokenizer: Tokenizer,
    vision: Session,
    embed: Session,
    decoder: Session,
}

pub(crate) fn load_tokenizer(dir: &ModelDir) -> Result<Tokenizer, CaptionModelError> {
    let path = dir.path("tokenizer.json");
    Tokenizer::from_file(&path).map_err(|e| CaptionModelError::Tokenizer {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Checks that a graph input is float32: fp16 exports need a half-precision cache, which this
/// decoder does not implement yet.
pub(crate) fn require_float32(
    dir: &ModelDir,
    role: &str,
    input: &str,
) -> Result<(), CaptionModelError> {
    let spec = dir.graph(role)?;
    if let Some(t) = spec.inputs.iter().find(|t| t.name == input) {
        if t.dtype != "float32" {
            return Err(CaptionModelError::Unsupported {
                model: dir.root().display().to_string(),
                message: format!(
                    "graph `{role}` input `{input}` is {}; cip decodes float32 exports only (export with --dtype fp32)",
                    t.dtype
                ),
            });
        }
    }
    Ok(())
}

/// `decode(ids, skip_special_tokens=True).strip()` with Python's notion of whitespace.
pub(crate) fn decode_caption(
    tokenizer: &Tokenizer,
    ids: &[i64],
) -> Result<String, CaptionModelError> {
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let text = tokenizer
        .decode(&ids, true)
        .map_err(|e| CaptionModelError::Tokenizer {
            path: "tokenizer.json".into(),
            message: e.to_string(),
        })?;
    Ok(text
        .trim_matches(|c: char| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c))
        .to_string())
}

pub(crate) fn encode(
    tokenizer: &Tokenizer,
    text: &str,
    special: bool,
) -> Result<Vec<i64>, CaptionModelError> {
    let encoding = tokenizer
        .encode(text, special)
        .map_err(|e| CaptionModelError::Tokenizer {
            path: "tokenizer.json".into(),
            message: e.to_string(),
        })?;
    Ok(encoding.get_ids().iter().map(|&i| i as i64).collect())
}

impl Blip2 {
    pub fn open(dir: &Path, session: &SessionConfig) -> Result<Blip2, CaptionModelError> {
        let dir = ModelDir::open(dir, Some(Family::Blip2))?;
        require_float32(&dir, "decoder", "inputs_embeds")?;
        Ok(Blip2 {
            name: dir.root().display().to_string(),
            config: dir.config_as()?,
            image: dir.config_as()?,
            tokenizer: load_tokenizer(&dir)?,
            vision: dir.session("vision", session)?,
            embed: dir.session("embed", session)?,
            decoder: dir.session("decoder", session)?,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Ends ONNX Runtime profiling (sessions opened with `SessionConfig::profile`); returns the
    /// profile files, one per graph.
    pub fn end_profiling(&mut self) -> Result<Vec<std::path::PathBuf>, CaptionModelError> {
        let mut files = Vec::new();
        for (role, session) in [
            ("vision", &mut self.vision),
            ("embed", &mut self.embed),
            ("decoder", &mut self.decoder),
        ] {
            let file = session
                .end_profiling()
                .map_err(graph_error(&self.name, role))?;
            files.push(file.into());
        }
        Ok(files)
    }

    pub fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            eos: self.config.eos_token_id.clone(),
            pad: self.config.pad_token_id,
        }
    }

    /// Prefix ids and attention mask per row: image tokens, then BOS (no prompt) or the encoded
    /// prompt, rows padded on `prompt_padding_side` after the image tokens.
    pub fn prefix(
        &self,
        batch: usize,
        prompts: Option<&[String]>,
    ) -> Result<(TokenRows, TokenRows), CaptionModelError> {
        let texts: Vec<Vec<i64>> = match prompts {
            None => vec![vec![self.config.bos_token_id]; batch],
            Some(p) => p
                .iter()
                .map(|t| encode(&self.tokenizer, t, true))
                .collect::<Result<_, _>>()?,
        };
        let longest = texts.iter().map(Vec::len).max().unwrap_or(0);
        let nq = self.config.num_query_tokens;
        let mut ids = Vec::new();
        let mut masks = Vec::new();
        for text in texts {
            let pad = longest - text.len();
            let mut row = vec![self.config.image_token_index; nq];
            let mut mask = vec![1; nq];
            let left = self.config.prompt_padding_side == "left";
            if left {
                row.extend(std::iter::repeat_n(self.config.pad_token_id, pad));
                mask.extend(std::iter::repeat_n(0, pad));
            }
            mask.extend(std::iter::repeat_n(1, text.len()));
            row.extend(text);
            if !left {
                row.extend(std::iter::repeat_n(self.config.pad_token_id, pad));
                mask.extend(std::iter::repeat_n(0, pad));
            }
            ids.push(row);
            masks.push(mask);
        }
        Ok((ids, masks))
    }

    /// Runs the vision graph on `[batch, 3, H, W]` pixels: `query_embeds` `[batch, nq, hidden]`.
    pub fn query_embeds(
        &mut self,
        pixel_values: &[f32],
        batch: usize,
    ) -> Result<RowTensor, CaptionModelError> {
        let (h, w) = (self.image.image_height, self.image.image_width);
        check_pixels(pixel_values, batch, h, w)?;
        let error = graph_error(&self.name, "vision");
        let pixels = Tensor::from_array((
            vec![batch as i64, 3, h as i64, w as i64],
            pixel_values.to_vec(),
        ))
        .map_err(&error)?;
        let outputs = self
            .vision
            .run(ort::inputs!["pixel_values" => pixels])
            .map_err(&error)?;
        RowTensor::from_value(&outputs["query_embeds"]).map_err(&error)
    }

    /// `generate` on one batch of preprocessed pixels.
    pub fn generate(
        &mut self,
        pixel_values: &[f32],
        batch: usize,
        prompts: Option<&[String]>,
        options: &GenerateOptions,
    ) -> Result<Generated, CaptionModelError> {
        let query = self.query_embeds(pixel_values, batch)?;
        let (ids, mask) = self.prefix(batch, prompts)?;
        let special = self.special_tokens();
        let mut step = Blip2Step {
            name: &self.name,
            config: &self.config,
            embed: &mut self.embed,
            decoder: &mut self.decoder,
            query,
            prefix: ids.clone(),
            state: DecoderState::new(
                mask,
                self.config.num_layers,
                self.config.num_heads,
                self.config.head_dim,
            ),
        };
        generate(&mut step, &ids, options, &special)
    }

    /// Captions (new ids decoded, special tokens skipped, stripped) and the new ids per image.
    pub fn captions(&self, generated: &Generated) -> Result<Vec<String>, CaptionModelError> {
        generated
            .new_ids()
            .iter()
            .map(|ids| decode_caption(&self.tokenizer, ids))
            .collect()
    }
}

pub(crate) fn check_pixels(
    pixel_values: &[f32],
    batch: usize,
    height: usize,
    width: usize,
) -> Result<(), CaptionModelError> {
    let expected = batch * 3 * height * width;
    if pixel_values.len() != expected {
        return Err(CaptionModelError::PixelShape {
            got: pixel_values.len(),
            expected,
            batch,
            height,
            width,
        });
    }
    Ok(())
}

pub(crate) fn graph_error<'a>(
    model: &'a str,
    graph: &'a str,
) -> impl Fn(ort::Error) -> CaptionModelError + 'a {
    move |e| CaptionModelError::Graph {
        model: model.to_string(),
        graph: graph.to_string(),
        message: e.to_string(),
    }
}

struct Blip2Step<'a> {
    name: &'a str,
    config: &'a Blip2Config,
    embed: &'a mut Session,
    decoder: &'a mut Session,
    query: RowTensor,
    prefix: Vec<Vec<i64>>,
    state: DecoderState,
}

impl Blip2Step<'_> {
    fn embed(&mut self, ids: Vec<i64>, rows: usize) -> Result<RowTensor, CaptionModelError> {
        let error = graph_error(self.name, "embed");
        let sequence = ids.len() / rows;
        let input =
            Tensor::from_array((vec![rows as i64, sequence as i64], ids)).map_err(&error)?;
        let outputs = self
            .embed
            .run(ort::inputs!["input_ids" => input])
            .map_err(&error)?;
        RowTensor::from_value(&outputs["inputs_embeds"]).map_err(&error)
    }

    fn run_decoder(
        &mut self,
        embeds: RowTensor,
        positions: Vec<i64>,
    ) -> Result<Vec<f32>, CaptionModelError> {
        let value: DynValue = embeds
            .to_value()
            .map_err(graph_error(self.name, "decoder"))?;
        self.state.run(
            self.decoder,
            self.name,
            ("inputs_embeds", value),
            positions,
            Vec::new(),
        )
    }
}

impl StepModel for Blip2Step<'_> {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn expand_rows(&mut self, times: usize) {
        let sources = expansion(self.prefix.len(), times);
        self.query.select_rows(&sources);
        self.prefix = sources.iter().map(|&s| self.prefix[s].clone()).collect();
        self.state.select_rows(&sources);
    }

    fn prefill(&mut self) -> Result<Vec<f32>, CaptionModelError> {
        let rows = self.prefix.len();
        let ids: Vec<i64> = self.prefix.iter().flatten().copied().collect();
        let mut embeds = self.embed(ids, rows)?;
        // The <image> positions take the row's query embeddings, in order.
        let hidden = self.config.hidden_size;
        let sequence = self.prefix[0].len();
        for (r, row_ids) in self.prefix.iter().enumerate() {
            let query = self.query.row(r);
            let mut next_query = 0;
            for (p, &id) in row_ids.iter().enumerate() {
                if id == self.config.image_token_index {
                    let at = (r * sequence + p) * hidden;
                    embeds.data[at..at + hidden]
                        .copy_from_slice(&query[next_query * hidden..(next_query + 1) * hidden]);
                    next_query += 1;
                }
            }
        }
        let positions = self.state.prefix_positions();
        self.run_decoder(embeds, positions)
    }

    fn step(&mut self, tokens: &[i64]) -> Result<Vec<f32>, CaptionModelError> {
        let embeds = self.embed(tokens.to_vec(), tokens.len())?;
        let positions = self.state.step_positions();
        self.run_decoder(embeds, positions)
    }

    fn reorder_rows(&mut self, sources: &[usize]) {
        self.state.select_rows(sources);
    }
}
