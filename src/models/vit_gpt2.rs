//! ViT-GPT2 (`VisionEncoderDecoderModel`) on ONNX Runtime: the `encoder` graph computes the
//! cross-attention keys/values once; the `decoder` graph takes them unchanged at every step.

use std::path::Path;

use ort::session::Session;
use ort::value::Tensor;
use serde::Deserialize;
use tokenizers::Tokenizer;

use super::blip2::{check_pixels, decode_caption, encode, graph_error, load_tokenizer};
use super::decoding::{
    expansion, generate, CaptionModelError, DecoderState, GenerateOptions, Generated, RowTensor,
    SpecialTokens, StepModel,
};
use super::preprocess::ImageSettings;
use crate::runtime::{Family, ModelDir, SessionConfig};

/// The `[config]` keys of a `vit-gpt2` model directory that decoding needs.
#[derive(Debug, Clone, Deserialize)]
pub struct VitGpt2Config {
    pub decoder_start_token_id: i64,
    pub eos_token_id: Vec<i64>,
    pub pad_token_id: i64,
    pub vocab_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
}

/// An opened ViT-GPT2 model directory.
pub struct VitGpt2 {
    name: String,
    pub config: VitGpt2Config,
    pub image: ImageSettings,
    tokenizer: Tokenizer,
    encoder: Session,
    decoder: Session,
}

impl VitGpt2 {
    pub fn open(dir: &Path, session: &SessionConfig) -> Result<VitGpt2, CaptionModelError> {
        let dir = ModelDir::open(dir, Some(Family::VitGpt2))?;
        require_float32_cache(&dir)?;
        Ok(VitGpt2 {
            name: dir.root().display().to_string(),
            config: dir.config_as()?,
            image: dir.config_as()?,
            tokenizer: load_tokenizer(&dir)?,
            encoder: dir.session("encoder", session)?,
            decoder: dir.session("decoder", session)?,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            eos: self.config.eos_token_id.clone(),
            pad: self.config.pad_token_id,
        }
    }

    /// `[decoder_start] + encode(prompt)` on every row (the same prompt for all: transformers'
    /// encoder-decoder `generate` has no padding-aware positions).
    pub fn prefix(
        &self,
        batch: usize,
        prompt: Option<&str>,
    ) -> Result<Vec<Vec<i64>>, CaptionModelError> {
        let mut row = vec![self.config.decoder_start_token_id];
        if let Some(p) = prompt {
            row.extend(encode(&self.tokenizer, p, false)?);
        }
        Ok(vec![row; batch])
    }

    /// Runs the encoder: the cross-attention keys/values per layer (key, value, key, ...).
    pub fn encode_images(
        &mut self,
        pixel_values: &[f32],
        batch: usize,
    ) -> Result<Vec<RowTensor>, CaptionModelError> {
        let (h, w) = (self.image.image_height, self.image.image_width);
        check_pixels(pixel_values, batch, h, w)?;
        let error = graph_error(&self.name, "encoder");
        let pixels = Tensor::from_array((
            vec![batch as i64, 3, h as i64, w as i64],
            pixel_values.to_vec(),
        ))
        .map_err(&error)?;
        let outputs = self
            .encoder
            .run(ort::inputs!["pixel_values" => pixels])
            .map_err(&error)?;
        (0..2 * self.config.num_layers)
            .map(|i| {
                let kind = if i % 2 == 0 { "key" } else { "value" };
                RowTensor::from_value(
                    &outputs[format!("cross_attention.{}.{kind}", i / 2).as_str()],
                )
                .map_err(&error)
            })
            .collect()
    }

    pub fn generate(
        &mut self,
        pixel_values: &[f32],
        batch: usize,
        prompt: Option<&str>,
        options: &GenerateOptions,
    ) -> Result<Generated, CaptionModelError> {
        let cross = self.encode_images(pixel_values, batch)?;
        let ids = self.prefix(batch, prompt)?;
        let special = self.special_tokens();
        let mask = ids.iter().map(|r| vec![1; r.len()]).collect();
        let mut step = VitGpt2Step {
            name: &self.name,
            vocab: self.config.vocab_size,
            decoder: &mut self.decoder,
            cross,
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

    pub fn captions(&self, generated: &Generated) -> Result<Vec<String>, CaptionModelError> {
        generated
            .new_ids()
            .iter()
            .map(|ids| decode_caption(&self.tokenizer, ids))
            .collect()
    }
}

fn require_float32_cache(dir: &ModelDir) -> Result<(), CaptionModelError> {
    super::blip2::require_float32(dir, "decoder", "past_key_values.0.key")
}

struct VitGpt2Step<'a> {
    name: &'a str,
    vocab: usize,
    decoder: &'a mut Session,
    cross: Vec<RowTensor>,
    prefix: Vec<Vec<i64>>,
    state: DecoderState,
}

impl VitGpt2Step<'_> {
    fn run_decoder(
        &mut self,
        ids: Vec<i64>,
        positions: Vec<i64>,
    ) -> Result<Vec<f32>, CaptionModelError> {
        let error = graph_error(self.name, "decoder");
        let rows = self.prefix.len();
        let sequence = ids.len() / rows;
        let input = Tensor::from_array((vec![rows as i64, sequence as i64], ids))
            .map_err(&error)?
            .into_dyn();
        let mut extra = Vec::new();
        for (i, c) in self.cross.iter().enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            extra.push((
                format!("cross_attention.{}.{kind}", i / 2),
                c.to_value().map_err(&error)?,
            ));
        }
        self.state.run(
            self.decoder,
            self.name,
            ("input_ids", input),
            positions,
            extra,
        )
    }
}

impl StepModel for VitGpt2Step<'_> {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn expand_rows(&mut self, times: usize) {
        let sources = expansion(self.prefix.len(), times);
        for c in &mut self.cross {
            c.select_rows(&sources);
        }
        self.prefix = sources.iter().map(|&s| self.prefix[s].clone()).collect();
        self.state.select_rows(&sources);
    }

    fn prefill(&mut self) -> Result<Vec<f32>, CaptionModelError> {
        let ids: Vec<i64> = self.prefix.iter().flatten().copied().collect();
        let positions = self.state.prefix_positions();
        self.run_decoder(ids, positions)
    }

    fn step(&mut self, tokens: &[i64]) -> Result<Vec<f32>, CaptionModelError> {
        let positions = self.state.step_positions();
        self.run_decoder(tokens.to_vec(), positions)
    }

    fn reorder_rows(&mut self, sources: &[usize]) {
        // Every beam of an item shares the item's cross-attention, so only the state moves.
        self.state.select_rows(sources);
    }
}
