"""BLIP-2 (OPT language model) -> cip model directory.

Layout (models/README.md, "BLIP-2"):
  vision/model.onnx   pixel_values [batch, 3, H, W] f32 -> query_embeds [batch, num_query_tokens, lm_hidden]
                      (vision encoder + Q-Former + language projection)
  embed/model.onnx    input_ids [batch, sequence] i64 -> inputs_embeds [batch, sequence, lm_hidden]
  decoder/model.onnx  inputs_embeds, attention_mask [batch, past + sequence] i64,
                      position_ids [batch, sequence] i64, past_key_values.<i>.key/.value
                      [batch, heads, past_sequence, head_dim] -> logits [batch, sequence, vocab] f32,
                      present.<i>.key/.value [batch, heads, past_sequence + sequence, head_dim]
  tokenizer.json, preprocessor_config.json, generation_config.json, cip-model.toml

Why a separate embedding graph: transformers builds the first decoder input as token embeddings
with the query embeddings scattered over the `<image>` positions; every later step embeds one
token. With `inputs_embeds` as the decoder's only token input, one decoder graph serves both; the
cost is a second copy of the (tied) embedding matrix, ~3% of OPT-2.7b.

Why explicit position_ids: transformers 5's `generate` computes them itself (cumsum of the
attention mask - 1, padding set to 0, then last + 1 per step) and passes them to OPT, whose learned
position table is indexed at position_ids + 2. The graph adds the offset; the caller passes what
`generate` would.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import decoder_graphs as dg
from . import test_images as ti
from .common import write_manifest

FAMILY = "blip2"
DEFAULT_SOURCE = "Salesforce/blip2-opt-2.7b"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help="hub id or local directory of a Blip2ForConditionalGeneration (OPT) checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="output model directory")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"],
                        help="weights and activations of the graphs (pixel_values and logits stay float32)")


def export(args: argparse.Namespace) -> Path:
    return export_blip2(args.source, args.out, args.dtype)


# ---------------------------------------------------------------------------------------------
# Graph modules


class VisionToQueryEmbeds(nn.Module):
    """pixel_values -> the language-model-space query embeddings, as Blip2ForConditionalGeneration
    computes them in `generate` (the Q-Former runs in float32, as transformers keeps it)."""

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model
        self.qformer = model.qformer
        self.query_tokens = model.query_tokens
        self.language_projection = model.language_projection
        self.dtype = model.language_projection.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values.to(self.dtype), return_dict=True).last_hidden_state
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = self.qformer(
            query_embeds=query_tokens, encoder_hidden_states=image_embeds, return_dict=True
        ).last_hidden_state
        return self.language_projection(query_output.to(self.dtype))


class TokenEmbedding(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class OptDecoderStep(nn.Module):
    """One OPT forward over `sequence` new positions given the cache of `past_sequence` positions.

    Mirrors transformers' OPTForCausalLM (eager attention) operation for operation, including
    where q is scaled, so the graph matches `generate` token for token.
    """

    def __init__(self, lm):
        super().__init__()
        config = lm.config
        decoder = lm.model.decoder
        self.decoder = decoder
        self.lm_head = lm.lm_head
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.pre_norm = config.do_layer_norm_before
        self.position_offset = decoder.embed_positions.offset

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        decoder = self.decoder
        seq = inputs_embeds.shape[1]
        visible = dg.causal_padding_mask(attention_mask, seq)
        positions = decoder.embed_positions.weight[position_ids + self.position_offset]
        hidden = inputs_embeds
        if decoder.project_in is not None:
            hidden = decoder.project_in(hidden)
        hidden = hidden + positions.to(hidden.dtype)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(decoder.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.self_attn_layer_norm(hidden) if self.pre_norm else hidden
            query = dg.split_heads(attn.q_proj(x) * attn.scaling, self.num_heads)
            key = torch.cat([past_key_values[2 * i], dg.split_heads(attn.k_proj(x), self.num_heads)], dim=2)
            value = torch.cat([past_key_values[2 * i + 1], dg.split_heads(attn.v_proj(x), self.num_heads)], dim=2)
            presents += [key, value]
            out = dg.attend(query, key, value, visible, scale=1.0)
            hidden = residual + attn.out_proj(dg.merge_heads(out))
            if not self.pre_norm:
                hidden = layer.self_attn_layer_norm(hidden)
            residual = hidden
            x = layer.final_layer_norm(hidden) if self.pre_norm else hidden
            hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(x)))
            if not self.pre_norm:
                hidden = layer.final_layer_norm(hidden)
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        logits = self.lm_head(hidden).to(torch.float32)
        return (logits, *presents)


# ---------------------------------------------------------------------------------------------
# Export


def load(source: str | Path, dtype: str = "fp32"):
    """Model and processor as transformers loads them (offline unless the CLI says --online)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    processor = Blip2Processor.from_pretrained(str(source))
    model = Blip2ForConditionalGeneration.from_pretrained(str(source), dtype=dg.torch_dtype(dtype))
    model.eval()
    _check_supported(model)
    tokenizer = processor.tokenizer
    image_id = tokenizer.get_vocab().get("<image>")
    if len(tokenizer) < model.config.text_config.vocab_size // 2:
        raise ValueError(f"{source}: the tokenizer loaded with only {len(tokenizer)} tokens (incomplete checkpoint, "
                         "or a hub id that is not cached while offline?)")
    if image_id != model.config.image_token_index:
        raise ValueError(f"{source}: the tokenizer's <image> id is {image_id} but the model's image_token_index is "
                         f"{model.config.image_token_index}: re-save processor and model together")
    return model, processor


def _check_supported(model) -> None:
    config = model.config
    if not config.use_decoder_only_language_model or config.text_config.model_type != "opt":
        raise ValueError(
            f"BLIP-2 with a {config.text_config.model_type} language model is not supported: cip exports the "
            "OPT variants (e.g. Salesforce/blip2-opt-2.7b, blip2-opt-6.7b)"
        )
    if config.image_token_index is None:
        raise ValueError("the checkpoint's config has no image_token_index: use a transformers>=4.47 conversion")


def export_blip2(source: str | Path, out: Path, dtype: str = "fp32", source_label: str | None = None) -> Path:
    """Export a checkpoint (hub id or local directory); source_label replaces the recorded source
    (the fixtures come from a temporary directory whose name must not reach the manifest)."""
    dg.prepare_out_dir(out)  # refuse a foreign directory before spending minutes on loading
    model, processor = load(source, dtype)
    return export_loaded(model, processor, out, dtype=dtype, source=source_label or str(source))


def export_loaded(model, processor, out: Path, dtype: str, source: str) -> Path:
    """Write the three graphs, tokenizer, configs and manifest for an already loaded model."""
    out = dg.prepare_out_dir(out)
    config = model.config
    text = config.text_config
    lm = model.language_model
    heads = text.num_attention_heads
    head_dim = text.hidden_size // heads
    layers = text.num_hidden_layers
    float_dtype = model.language_projection.weight.dtype
    image_processor = processor.image_processor
    height, width = int(image_processor.size["height"]), int(image_processor.size["width"])

    with torch.no_grad():
        dg.export_graph(
            VisionToQueryEmbeds(model).eval(),
            (torch.zeros(2, 3, height, width),),
            out / "vision" / "model.onnx",
            ["pixel_values"], ["query_embeds"],
            {"pixel_values": ["batch", 3, height, width],
             "query_embeds": ["batch", config.num_query_tokens, text.hidden_size]},
        )
        dg.export_graph(
            TokenEmbedding(lm.get_input_embeddings()).eval(),
            (torch.zeros(2, 3, dtype=torch.long),),
            out / "embed" / "model.onnx",
            ["input_ids"], ["inputs_embeds"],
            {"input_ids": ["batch", "sequence"],
             "inputs_embeds": ["batch", "sequence", text.word_embed_proj_dim]},
        )
        past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        present_names = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        batch, seq, past = 2, 3, 4
        example = (
            torch.zeros(batch, seq, text.word_embed_proj_dim, dtype=float_dtype),
            torch.ones(batch, past + seq, dtype=torch.long),
            torch.arange(past, past + seq).repeat(batch, 1),
            [torch.zeros(batch, heads, past, head_dim, dtype=float_dtype) for _ in past_names],
        )
        dims: dict[str, list[Any]] = {
            "inputs_embeds": ["batch", "sequence", text.word_embed_proj_dim],
            "attention_mask": ["batch", "total_sequence"],
            "position_ids": ["batch", "sequence"],
            "logits": ["batch", "sequence", text.vocab_size],
        }
        dims.update({n: ["batch", heads, "past_sequence", head_dim] for n in past_names})
        dims.update({n: ["batch", heads, "total_sequence", head_dim] for n in present_names})
        dg.export_graph(
            OptDecoderStep(lm).eval(), example, out / "decoder" / "model.onnx",
            ["inputs_embeds", "attention_mask", "position_ids", *past_names],
            ["logits", *present_names], dims,
        )

    processor.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    image_processor.to_json_file(str(out / "preprocessor_config.json"))
    # Copied for provenance only: Blip2ForConditionalGeneration.generate calls the OPT model's
    # generate, whose defaults come from text_config (see [config.generation]).
    model.generation_config.to_json_file(str(out / "generation_config.json"))

    graphs = {"vision": "vision/model.onnx", "embed": "embed/model.onnx", "decoder": "decoder/model.onnx"}
    return write_manifest(out, FAMILY, dtype, source, graphs, manifest_config(model, processor))


def manifest_config(model, processor) -> dict[str, Any]:
    config = model.config
    text = config.text_config
    tokenizer = processor.tokenizer
    generation = dg.generation_defaults(model.language_model.generation_config)
    facts: dict[str, Any] = {
        "language_model": "opt",
        "num_query_tokens": int(config.num_query_tokens),
        "image_token_index": int(config.image_token_index),
        "bos_token_id": int(text.bos_token_id),
        "eos_token_id": generation["eos_token_id"],
        "pad_token_id": int(text.pad_token_id),
        "vocab_size": int(text.vocab_size),
        "tokenizer_size": len(tokenizer),
        "hidden_size": int(text.word_embed_proj_dim),
        "num_layers": int(text.num_hidden_layers),
        "num_heads": int(text.num_attention_heads),
        "head_dim": int(text.hidden_size // text.num_attention_heads),
        "max_position_embeddings": int(text.max_position_embeddings),
        # The recipe `generate` follows; models/README.md spells it out.
        "prefix": "image_tokens_then_text",
        "prompt_padding_side": tokenizer.padding_side,
        "output_includes_prefix": True,
        "position_ids": "cumsum_mask_minus_one_pad_zero_then_increment",
        # do_convert_rgb: transformers' convert_to_rgb (alpha composited on white, else Pillow's
        # convert("RGB")).
        "rgb_conversion": "transformers_convert_to_rgb",
        "generation": generation,
    }
    facts.update(dg.image_processor_facts(processor.image_processor))
    return facts


# ---------------------------------------------------------------------------------------------
# Tiny fixture

TINY_IMAGE_SIZE = 32
TINY_QUERY_TOKENS = 4
# Weights drawn from N(0, TINY_WEIGHT_STD): the library's 0.02 init gives near-equal logits, so the
# argmax would hang on rounding noise and every image would get the same caption.
TINY_WEIGHT_STD = 0.5
# How captions end (see tiny_model): the EOS logit grows by about EOS_RAMP * EOS_NORM per position.
# These values give a mix of captions that stop after 4-15 tokens and ones that run to 16.
EOS_RAMP = 0.2
EOS_NORM = 5.0


def tiny_processor():
    """BLIP-2 processor over the offline OPT-style tokenizer (adds `<image>` as the last id)."""
    from transformers import BlipImageProcessor, Blip2Processor

    from .gpt2_tokenizer import opt_tokenizer

    tokenizer = opt_tokenizer()
    base = len(tokenizer)
    image_processor = BlipImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=TINY_QUERY_TOKENS)
    if len(tokenizer) != base + 1 or tokenizer.convert_tokens_to_ids("<image>") != base:
        raise AssertionError("Blip2Processor did not add <image> as the last token")
    return processor


def tiny_image_processor(backend: str):
    """The tiny fixture's image processor settings (BLIP's: bicubic, CLIP mean/std, RGB) on either
    transformers 5 backend."""
    from transformers import BlipImageProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    cls = {"torchvision": BlipImageProcessor, "pil": BlipImageProcessorPil}[backend]
    return cls(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})


def tiny_model(processor):
    """A tiny Blip2ForConditionalGeneration whose config is built after the processor (so the
    vocabulary includes `<image>`). Like Salesforce/blip2-opt-*, generation stops at "\\n".

    A random BLIP-2 either never emits EOS or emits it at once. Here the OPT position table gets a
    ramp along a unit direction d and the (tied) EOS embedding row is EOS_NORM * d: the EOS logit
    then rises with the position, so captions are non-empty and end at varied lengths, which
    exercises per-row stopping and beam hypotheses of different lengths.
    """
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig,
                              Blip2VisionConfig, OPTConfig)

    tokenizer = processor.tokenizer
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    text = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=newline, pad_token_id=tokenizer.pad_token_id,
    )
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=TINY_IMAGE_SIZE, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 encoder_hidden_size=32, max_position_embeddings=64, vocab_size=64)
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=TINY_QUERY_TOKENS, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                nn.init.normal_(param, std=TINY_WEIGHT_STD)
        direction = torch.randn(text.hidden_size, generator=torch.Generator().manual_seed(1))
        direction /= direction.norm()
        table = model.language_model.model.decoder.embed_positions.weight
        # Row r of OPT's table holds position r - offset (offset 2).
        position = torch.arange(table.shape[0], dtype=table.dtype) - model.language_model.model.decoder.embed_positions.offset
        table += position[:, None] * EOS_RAMP * direction
        model.language_model.get_output_embeddings().weight[newline] = EOS_NORM * direction
    return model


# ---------------------------------------------------------------------------------------------
# References

# Different lengths per row: the processor left-pads them (between the image tokens and BOS).
MIXED_PROMPTS = ["a photo of", "a", "a picture of a dog on the", "the", "a photo of a"]


def prompts_for(kind: str, batch_size: int) -> list[str] | None:
    if kind == "none":
        return None
    if kind == "photo":
        return [ti.PROMPT] * batch_size
    if kind == "mixed":
        return MIXED_PROMPTS[:batch_size]
    raise ValueError(kind)


def generate_prefix(model, processor, prompts: list[str] | None, batch_size: int):
    """The decoder's prefix ids and mask exactly as Blip2ForConditionalGeneration.generate builds
    them: without a prompt, num_query_tokens `<image>` ids then BOS; with prompts, the processor's
    ids (image tokens, then the left-padded tokenized prompt starting with BOS)."""
    config = model.config
    if prompts is None:
        row = [config.image_token_index] * config.num_query_tokens + [config.text_config.bos_token_id]
        ids = torch.tensor([row] * batch_size)
        return ids, torch.ones_like(ids)
    encoded = processor(images=None, text=prompts, padding=True, return_tensors="pt")
    image_ids = torch.full((batch_size, config.num_query_tokens), config.image_token_index)
    ids = torch.cat([image_ids, encoded["input_ids"]], dim=1)
    mask = torch.cat([torch.ones_like(image_ids), encoded["attention_mask"]], dim=1)
    return ids, mask


def write_references(model, processor, out_dir: Path, images_root: Path) -> None:
    """Token ids and captions from transformers' generate for every case, plus the inputs and
    first-step logits, under reference/blip2/."""
    import transformers
    from safetensors.torch import save_file

    from .test_images import load_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_files = ti.image_files()
    tensors: dict[str, torch.Tensor] = {}
    pixel_values = {}
    for batch, names in ti.REFERENCE_BATCHES.items():
        images = [load_image(images_root, image_files[n]) for n in names]
        pixel_values[batch] = processor(images=images, return_tensors="pt")["pixel_values"]
        tensors[f"{batch}.pixel_values"] = pixel_values[batch]
        with torch.no_grad():
            tensors[f"{batch}.query_embeds"] = _query_embeds(model, pixel_values[batch])
    cases = []
    for case in ti.reference_cases(("none", "photo", "mixed")):
        names = ti.REFERENCE_BATCHES[case["batch"]]
        prompts = prompts_for(case["prompt"], len(names))
        prefix_ids, prefix_mask = generate_prefix(model, processor, prompts, len(names))
        inputs: dict[str, Any] = {"pixel_values": pixel_values[case["batch"]]}
        if prompts is not None:
            # The user-facing call: processor(images, text) -> generate(**inputs).
            images = [load_image(images_root, image_files[n]) for n in names]
            encoded = processor(images=images, text=prompts, padding=True, return_tensors="pt")
            if not (torch.equal(encoded["input_ids"], prefix_ids) and torch.equal(encoded["attention_mask"], prefix_mask)):
                raise AssertionError(f"{case['name']}: processor ids differ from the documented prefix recipe")
            inputs = dict(encoded)
        with torch.no_grad():
            output = model.generate(**inputs, **case["generate_kwargs"])
        prefix_len = prefix_ids.shape[1]
        if not torch.equal(output[:, :prefix_len], prefix_ids):
            raise AssertionError(f"{case['name']}: generate's output does not start with the prefix ids")
        new_ids = output[:, prefix_len:]
        cases.append({
            "name": case["name"],
            "batch": case["batch"],
            "images": [image_files[n] for n in names],
            "pixel_values": f"{case['batch']}.pixel_values",
            "prompts": prompts,
            "generate_kwargs": case["generate_kwargs"],
            "prefix_ids": prefix_ids.tolist(),
            "prefix_attention_mask": prefix_mask.tolist(),
            "output_ids": output.tolist(),
            "new_ids": new_ids.tolist(),
            "texts": processor.batch_decode(output, skip_special_tokens=True),
            "captions": [t.strip() for t in processor.batch_decode(new_ids, skip_special_tokens=True)],
        })
        if case["prompt"] in ("none", "mixed") and case["generate_kwargs"]["num_beams"] == 1 and len(case["generate_kwargs"]) == 2:
            with torch.no_grad():
                logits = model(pixel_values=inputs["pixel_values"], input_ids=prefix_ids,
                               attention_mask=prefix_mask).logits
            tensors[f"{case['batch']}.{case['prompt']}.prefix_last_logits"] = logits[:, -1].float()
    ti.check_stopping(cases, model.language_model.generation_config.eos_token_id)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(out_dir / "inputs.safetensors"))
    index = {
        "generator": "models/cip_export/blip2.py (make_fixture)",
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "model": "../../blip2-tiny",
        "images_root": "../preprocess",
        "tensors": "inputs.safetensors",
        "about": (
            "Ids from Blip2ForConditionalGeneration.generate (transformers, sdpa attention, CPU, "
            "float32) on the tiny fixture as saved with save_pretrained. Images (paths relative "
            "to images_root) are opened with Pillow and preprocessed by the fixture's processor "
            "('<batch>.pixel_values'). prefix_ids/prefix_attention_mask are the decoder input "
            "generate builds (query embeddings replace the <image> ids); output_ids is what "
            "generate returns: the prefix followed by max_new_tokens ids, rows that stopped "
            "padded with pad_token_id. texts = batch_decode(output_ids, skip_special_tokens=True); "
            "captions = batch_decode(new_ids, skip_special_tokens=True) stripped. "
            "'<batch>.query_embeds' is the vision graph's expected output, "
            "'<batch>.<prompt>.prefix_last_logits' the logits at the last prefix position."
        ),
        "cases": cases,
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")


def _query_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    image_embeds = model.vision_model(pixel_values, return_dict=True).last_hidden_state
    query = model.qformer(query_embeds=model.query_tokens.expand(pixel_values.shape[0], -1, -1),
                          encoder_hidden_states=image_embeds, return_dict=True).last_hidden_state
    return model.language_projection(query)


def make_fixture(root: Path) -> None:
    """tests/fixtures/blip2-tiny (exported with this module from a save_pretrained directory),
    reference/blip2 and reference/preprocess."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from .test_images import write_preprocess_references

    root = Path(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fixed reduction order: the references are byte-for-byte reproducible
    try:
        preprocess_dir = root / "reference" / "preprocess"
        write_preprocess_references(preprocess_dir, preprocess_processors())
        processor = tiny_processor()
        model = tiny_model(processor)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            export_blip2(tmp, root / "blip2-tiny", "fp32", source_label=TINY_SOURCE)
            saved_model = Blip2ForConditionalGeneration.from_pretrained(tmp).eval()
            saved_processor = Blip2Processor.from_pretrained(tmp)
        write_references(saved_model, saved_processor, root / "reference" / "blip2", preprocess_dir)
    finally:
        torch.set_num_threads(threads)


TINY_SOURCE = "tiny-random (cip_export.blip2.tiny_model)"


def preprocess_processors():
    """Both captioners' image processors, for reference/preprocess (either make_fixture writes the
    same files, so `fixtures --only` works for each)."""
    from . import vit_gpt2

    return {
        "blip2": (tiny_image_processor, ["as_loaded"]),
        "vit-gpt2": (vit_gpt2.tiny_image_processor, ["as_loaded", "model_card_rgb"]),
    }
