"""ViT-GPT2 (VisionEncoderDecoderModel: ViT encoder, GPT-2 decoder with cross-attention) -> cip
model directory.

Layout (models/README.md, "ViT-GPT2"):
  encoder/model.onnx  pixel_values [batch, 3, H, W] f32 -> encoder_hidden_states [batch, patches + 1,
                      encoder_hidden], cross_attention.<i>.key/.value [batch, heads, patches + 1, head_dim]
  decoder/model.onnx  input_ids [batch, sequence] i64, attention_mask [batch, past + sequence] i64,
                      position_ids [batch, sequence] i64, past_key_values.<i>.key/.value
                      [batch, heads, past_sequence, head_dim], cross_attention.<i>.key/.value
                      -> logits [batch, sequence, vocab] f32, present.<i>.key/.value
  tokenizer.json, preprocessor_config.json, generation_config.json, cip-model.toml

Cross-attention keys/values are computed once, by the encoder graph, and fed to every decoder step
(transformers caches them the same way). Recomputing them per step would cost, for ViT-base, about
thirty times the rest of a GPT-2 step. For beam search the caller repeats them per beam, as
`generate` repeats the encoder output.
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

FAMILY = "vit-gpt2"
DEFAULT_SOURCE = "nlpconnect/vit-gpt2-image-captioning"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help="hub id or local directory of a VisionEncoderDecoderModel (ViT + GPT-2)")
    parser.add_argument("--out", required=True, type=Path, help="output model directory")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"],
                        help="weights and activations of the graphs (pixel_values and logits stay float32)")


def export(args: argparse.Namespace) -> Path:
    return export_vit_gpt2(args.source, args.out, getattr(args, "dtype", "fp32"))


# ---------------------------------------------------------------------------------------------
# Graph modules


class EncoderWithCrossKeyValues(nn.Module):
    """pixel_values -> ViT output and every decoder layer's cross-attention keys and values."""

    def __init__(self, model):
        super().__init__()
        self.encoder = model.encoder
        self.enc_to_dec_proj = _enc_to_dec_proj(model)
        self.blocks = model.decoder.transformer.h
        self.num_heads = model.decoder.config.n_head
        self.dtype = model.decoder.lm_head.weight.dtype

    def forward(self, pixel_values: torch.Tensor):
        encoder_hidden_states = self.encoder(pixel_values=pixel_values.to(self.dtype), return_dict=True).last_hidden_state
        projected = encoder_hidden_states
        if self.enc_to_dec_proj is not None:
            projected = self.enc_to_dec_proj(projected)
        outputs = [encoder_hidden_states]
        for block in self.blocks:
            cross = block.crossattention
            key, value = cross.c_attn(projected).split(cross.split_size, dim=2)
            outputs += [dg.split_heads(key, self.num_heads), dg.split_heads(value, self.num_heads)]
        return tuple(outputs)


def _enc_to_dec_proj(model):
    """VisionEncoderDecoderModel projects the encoder output when the widths differ."""
    if (model.encoder.config.hidden_size != model.decoder.config.hidden_size
            and getattr(model.decoder.config, "cross_attention_hidden_size", None) is None):
        return model.enc_to_dec_proj
    return None


class Gpt2DecoderStep(nn.Module):
    """One GPT-2 forward over `sequence` new tokens with self-attention cache and precomputed
    cross-attention keys/values; mirrors GPT2LMHeadModel operation for operation."""

    def __init__(self, decoder):
        super().__init__()
        self.transformer = decoder.transformer
        self.lm_head = decoder.lm_head
        self.num_heads = decoder.config.n_head

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor],
                cross_key_values: list[torch.Tensor]):
        transformer = self.transformer
        seq = input_ids.shape[1]
        visible = dg.causal_padding_mask(attention_mask, seq)
        hidden = transformer.wte(input_ids) + transformer.wpe(position_ids)
        presents: list[torch.Tensor] = []
        for i, block in enumerate(transformer.h):
            attn = block.attn
            x = block.ln_1(hidden)
            query, key, value = attn.c_attn(x).split(attn.split_size, dim=2)
            key = torch.cat([past_key_values[2 * i], dg.split_heads(key, self.num_heads)], dim=2)
            value = torch.cat([past_key_values[2 * i + 1], dg.split_heads(value, self.num_heads)], dim=2)
            presents += [key, value]
            out = dg.attend(dg.split_heads(query, self.num_heads), key, value, visible, attn.scaling)
            hidden = hidden + attn.c_proj(dg.merge_heads(out))
            cross = block.crossattention
            x = block.ln_cross_attn(hidden)
            query = dg.split_heads(cross.q_attn(x), self.num_heads)
            out = dg.attend(query, cross_key_values[2 * i], cross_key_values[2 * i + 1], None, cross.scaling)
            hidden = hidden + cross.c_proj(dg.merge_heads(out))
            hidden = hidden + block.mlp(block.ln_2(hidden))
        logits = self.lm_head(transformer.ln_f(hidden)).to(torch.float32)
        return (logits, *presents)


# ---------------------------------------------------------------------------------------------
# Export


def load(source: str | Path, dtype: str = "fp32"):
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(str(source), dtype=dg.torch_dtype(dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    image_processor = AutoImageProcessor.from_pretrained(str(source))
    _check_supported(model, tokenizer)
    return model, tokenizer, image_processor


def _check_supported(model, tokenizer) -> None:
    encoder_type = model.config.encoder.model_type
    decoder_type = model.config.decoder.model_type
    if encoder_type != "vit" or decoder_type != "gpt2":
        raise ValueError(f"a {encoder_type} + {decoder_type} VisionEncoderDecoderModel is not supported: cip "
                         "exports ViT + GPT-2 (e.g. nlpconnect/vit-gpt2-image-captioning)")
    if model.decoder.config.reorder_and_upcast_attn:
        raise ValueError("GPT-2 with reorder_and_upcast_attn is not supported")
    if len(tokenizer) < model.decoder.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens for a {model.decoder.config.vocab_size}-token "
                         "model: it loaded incompletely (offline without cached files?)")


def export_vit_gpt2(source: str | Path, out: Path, dtype: str = "fp32", source_label: str | None = None) -> Path:
    dg.prepare_out_dir(out)  # refuse a foreign directory before spending minutes on loading
    model, tokenizer, image_processor = load(source, dtype)
    return export_loaded(model, tokenizer, image_processor, out, dtype, source_label or str(source))


def export_loaded(model, tokenizer, image_processor, out: Path, dtype: str, source: str) -> Path:
    out = dg.prepare_out_dir(out)
    decoder_config = model.decoder.config
    heads = decoder_config.n_head
    head_dim = decoder_config.n_embd // heads
    layers = decoder_config.n_layer
    float_dtype = model.decoder.lm_head.weight.dtype
    height, width = int(image_processor.size["height"]), int(image_processor.size["width"])
    encoder_seq = _encoder_sequence_length(model, height, width)
    cross_names = [f"cross_attention.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]

    with torch.no_grad():
        encoder_dims: dict[str, list[Any]] = {
            "pixel_values": ["batch", 3, height, width],
            "encoder_hidden_states": ["batch", encoder_seq, model.encoder.config.hidden_size],
        }
        encoder_dims.update({n: ["batch", heads, encoder_seq, head_dim] for n in cross_names})
        dg.export_graph(
            EncoderWithCrossKeyValues(model).eval(), (torch.zeros(2, 3, height, width),),
            out / "encoder" / "model.onnx", ["pixel_values"], ["encoder_hidden_states", *cross_names], encoder_dims,
        )
        batch, seq, past = 2, 3, 4
        example = (
            torch.zeros(batch, seq, dtype=torch.long),
            torch.ones(batch, past + seq, dtype=torch.long),
            torch.arange(past, past + seq).repeat(batch, 1),
            [torch.zeros(batch, heads, past, head_dim, dtype=float_dtype) for _ in past_names],
            [torch.zeros(batch, heads, encoder_seq, head_dim, dtype=float_dtype) for _ in cross_names],
        )
        dims: dict[str, list[Any]] = {
            "input_ids": ["batch", "sequence"],
            "attention_mask": ["batch", "total_sequence"],
            "position_ids": ["batch", "sequence"],
            "logits": ["batch", "sequence", decoder_config.vocab_size],
        }
        dims.update({n: ["batch", heads, "past_sequence", head_dim] for n in past_names})
        dims.update({n: ["batch", heads, encoder_seq, head_dim] for n in cross_names})
        dims.update({n: ["batch", heads, "total_sequence", head_dim] for n in present_names})
        dg.export_graph(
            Gpt2DecoderStep(model.decoder).eval(), example, out / "decoder" / "model.onnx",
            ["input_ids", "attention_mask", "position_ids", *past_names, *cross_names],
            ["logits", *present_names], dims,
        )

    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    image_processor.to_json_file(str(out / "preprocessor_config.json"))
    model.generation_config.to_json_file(str(out / "generation_config.json"))
    graphs = {"encoder": "encoder/model.onnx", "decoder": "decoder/model.onnx"}
    return write_manifest(out, FAMILY, dtype, source, graphs, manifest_config(model, tokenizer, image_processor))


def _encoder_sequence_length(model, height: int, width: int) -> int:
    patch = model.encoder.config.patch_size
    return (height // patch) * (width // patch) + 1  # + [CLS]


def manifest_config(model, tokenizer, image_processor) -> dict[str, Any]:
    decoder_config = model.decoder.config
    generation = dg.generation_defaults(model.generation_config)
    height, width = int(image_processor.size["height"]), int(image_processor.size["width"])
    facts: dict[str, Any] = {
        "decoder_start_token_id": int(generation["decoder_start_token_id"]),
        "bos_token_id": generation["bos_token_id"],
        "eos_token_id": generation["eos_token_id"],
        "pad_token_id": generation["pad_token_id"],
        "vocab_size": int(decoder_config.vocab_size),
        "tokenizer_size": len(tokenizer),
        "hidden_size": int(decoder_config.n_embd),
        "num_layers": int(decoder_config.n_layer),
        "num_heads": int(decoder_config.n_head),
        "head_dim": int(decoder_config.n_embd // decoder_config.n_head),
        "max_position_embeddings": int(decoder_config.n_positions),
        "encoder_sequence_length": _encoder_sequence_length(model, height, width),
        "encoder_hidden_size": int(model.encoder.config.hidden_size),
        "cross_attention": "precomputed_by_encoder",
        "prefix": "decoder_start_then_text",
        "output_includes_prefix": True,
        "position_ids": "arange_past_length",
        "rgb_conversion": "pillow_convert_rgb",
        "generation": generation,
    }
    facts.update(dg.image_processor_facts(image_processor))
    return facts


# ---------------------------------------------------------------------------------------------
# Tiny fixture

TINY_IMAGE_SIZE = 32
TINY_WEIGHT_STD = 0.5  # see blip2.TINY_WEIGHT_STD
# See tiny_model: how fast the EOS logit grows with the position. With this seed, these values give
# references with captions that stop after 7-13 tokens and ones that run to 16 (make_fixture checks).
EOS_RAMP = 0.6
EOS_NORM = 5.0
TINY_SEED = 5


def tiny_image_processor(backend: str):
    """ViT's processor settings (bilinear, mean/std 0.5, no RGB conversion) on either backend."""
    from transformers import ViTImageProcessor
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    cls = {"torchvision": ViTImageProcessor, "pil": ViTImageProcessorPil}[backend]
    return cls(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})


def tiny_model(tokenizer, eos_ramp: float = EOS_RAMP, eos_norm: float = EOS_NORM, seed: int = TINY_SEED):
    """A tiny VisionEncoderDecoderModel: ViT (width 24) + GPT-2 (width 32, cross-attention), so the
    encoder-to-decoder projection is exercised too. EOS is made reachable as in blip2.tiny_model:
    a position ramp along d and the EOS row (tied) = eos_norm * d."""
    from transformers import GPT2Config, GenerationConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    eos = tokenizer.eos_token_id
    encoder = ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        image_size=TINY_IMAGE_SIZE, patch_size=8)
    decoder = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                         add_cross_attention=True, is_decoder=True, bos_token_id=eos, eos_token_id=eos)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    # As nlpconnect/vit-gpt2-image-captioning: <|endoftext|> starts, ends and pads.
    config.decoder_start_token_id = eos
    config.pad_token_id = eos
    config.eos_token_id = eos
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=config).eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=eos, bos_token_id=eos, eos_token_id=eos,
                                               pad_token_id=eos)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                nn.init.normal_(param, std=TINY_WEIGHT_STD)
        direction = torch.randn(decoder.n_embd, generator=torch.Generator().manual_seed(1))
        direction /= direction.norm()
        table = model.decoder.transformer.wpe.weight
        # The start token is EOS, whose (tied) embedding is eos_norm * d: the ramp starts at
        # -eos_norm so position 0 cancels it, and EOS stays unlikely for the first tokens.
        position = torch.arange(table.shape[0], dtype=table.dtype) - eos_norm / eos_ramp
        table += position[:, None] * eos_ramp * direction
        model.decoder.get_output_embeddings().weight[eos] = eos_norm * direction
    return model


# ---------------------------------------------------------------------------------------------
# References


def generate_prefix(model, tokenizer, prompt: str | None, batch_size: int) -> torch.Tensor:
    """The decoder ids `generate` starts from: decoder_start_token_id, then the prompt's tokens
    (GPT-2's tokenizer adds no BOS). The same prompt on every row: no padding."""
    row = [model.generation_config.decoder_start_token_id]
    if prompt is not None:
        row += tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return torch.tensor([row] * batch_size)


def load_rgb(images_root: Path, file: str):
    """As the nlpconnect model card does: Pillow's convert("RGB") for non-RGB images (the
    processor has no do_convert_rgb and fails on grayscale, RGBA and CMYK input)."""
    return ti.model_card_rgb(ti.load_image(images_root, file))


def write_references(model, tokenizer, image_processor, out_dir: Path, images_root: Path) -> None:
    """Token ids and captions from VisionEncoderDecoderModel.generate for every case, plus inputs,
    encoder outputs and first-step logits, under reference/vit-gpt2/."""
    import transformers
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_files = ti.image_files()
    tensors: dict[str, torch.Tensor] = {}
    pixel_values = {}
    for batch, names in ti.REFERENCE_BATCHES.items():
        images = [load_rgb(images_root, image_files[n]) for n in names]
        pixel_values[batch] = image_processor(images, return_tensors="pt")["pixel_values"]
        tensors[f"{batch}.pixel_values"] = pixel_values[batch]
        with torch.no_grad():
            tensors[f"{batch}.encoder_hidden_states"] = model.encoder(pixel_values=pixel_values[batch]).last_hidden_state
    cases = []
    for case in ti.reference_cases(("none", "photo")):
        names = ti.REFERENCE_BATCHES[case["batch"]]
        prompt = ti.PROMPT if case["prompt"] == "photo" else None
        prefix_ids = generate_prefix(model, tokenizer, prompt, len(names))
        kwargs = dict(case["generate_kwargs"])
        if prompt is not None:
            kwargs["decoder_input_ids"] = prefix_ids
        with torch.no_grad():
            output = model.generate(pixel_values=pixel_values[case["batch"]], **kwargs)
        prefix_len = prefix_ids.shape[1]
        if not torch.equal(output[:, :prefix_len], prefix_ids):
            raise AssertionError(f"{case['name']}: generate's output does not start with the prefix ids")
        new_ids = output[:, prefix_len:]
        cases.append({
            "name": case["name"],
            "batch": case["batch"],
            "images": [image_files[n] for n in names],
            "pixel_values": f"{case['batch']}.pixel_values",
            "prompts": [prompt] * len(names) if prompt is not None else None,
            "generate_kwargs": case["generate_kwargs"],
            "decoder_input_ids_passed": prompt is not None,
            "prefix_ids": prefix_ids.tolist(),
            "output_ids": output.tolist(),
            "new_ids": new_ids.tolist(),
            "texts": tokenizer.batch_decode(output, skip_special_tokens=True),
            "captions": [t.strip() for t in tokenizer.batch_decode(new_ids, skip_special_tokens=True)],
        })
        if case["name"] in ("greedy_five_none", "greedy_five_photo"):
            with torch.no_grad():
                logits = model(pixel_values=pixel_values[case["batch"]], decoder_input_ids=prefix_ids).logits
            tensors[f"{case['batch']}.{case['prompt']}.prefix_last_logits"] = logits[:, -1].float()
    ti.check_stopping(cases, model.generation_config.eos_token_id)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(out_dir / "inputs.safetensors"))
    index = {
        "generator": "models/cip_export/vit_gpt2.py (make_fixture)",
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "model": "../../vit-gpt2-tiny",
        "images_root": "../preprocess",
        "tensors": "inputs.safetensors",
        "about": (
            "Ids from VisionEncoderDecoderModel.generate (transformers, sdpa attention, CPU, "
            "float32) on the tiny fixture as saved with save_pretrained. Images (paths relative to "
            "images_root) are opened with Pillow, converted with image.convert('RGB') when not RGB "
            "(the model card's recipe) and preprocessed by the fixture's image processor "
            "('<batch>.pixel_values'). Without a prompt generate starts from "
            "[decoder_start_token_id]; with one, the case passed decoder_input_ids = prefix_ids "
            "(start token + tokenized prompt). output_ids is what generate returns: the prefix "
            "followed by max_new_tokens ids, rows that stopped padded with pad_token_id. "
            "texts = batch_decode(output_ids, skip_special_tokens=True); captions = "
            "batch_decode(new_ids, skip_special_tokens=True) stripped. "
            "'<batch>.encoder_hidden_states' is the encoder graph's first output, "
            "'<batch>.<prompt>.prefix_last_logits' the logits at the last prefix position."
        ),
        "cases": cases,
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")


TINY_SOURCE = "tiny-random (cip_export.vit_gpt2.tiny_model)"


def make_fixture(root: Path) -> None:
    """tests/fixtures/vit-gpt2-tiny (exported with this module from a save_pretrained directory),
    reference/vit-gpt2 and reference/preprocess."""
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    from . import blip2
    from .gpt2_tokenizer import gpt2_tokenizer

    root = Path(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fixed reduction order: the references are byte-for-byte reproducible
    try:
        preprocess_dir = root / "reference" / "preprocess"
        ti.write_preprocess_references(preprocess_dir, blip2.preprocess_processors())
        tokenizer = gpt2_tokenizer()
        model = tiny_model(tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tiny_image_processor("torchvision").save_pretrained(tmp)
            export_vit_gpt2(tmp, root / "vit-gpt2-tiny", "fp32", source_label=TINY_SOURCE)
            saved_model = VisionEncoderDecoderModel.from_pretrained(tmp).eval()
            saved_tokenizer = AutoTokenizer.from_pretrained(tmp)
            saved_image_processor = AutoImageProcessor.from_pretrained(tmp)
        write_references(saved_model, saved_tokenizer, saved_image_processor, root / "reference" / "vit-gpt2",
                         preprocess_dir)
    finally:
        torch.set_num_threads(threads)
