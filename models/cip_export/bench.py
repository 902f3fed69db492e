"""Benchmark models and the reference side of `cip bench generate` / `cip bench caption`.

    python models/export.py bench sd15-prepare --dir .cip/bench/sd15
    python models/export.py bench sd15-time --dir .cip/bench/sd15 --steps 4 --size 128 --threads 2

`*-prepare` builds a model of the real architecture with random weights (no weights can be
downloaded here), saves it with `save_pretrained` under DIR/source and exports it with the export
tool's own code path to DIR/model. A finished DIR (DIR/model/cip-model.toml present) is reused.
`*-time` loads DIR/source in the reference library and prints one JSON line with the seconds of
each timed call, for cip's Rust side to compare against in the same run.

Random weights change no compute (same shapes, same kernels), so these time what the real model
would cost.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

BENCH_SEED = 1505
SD_BENCH_SOURCE_NAME = "cip bench: SD-1.5 architecture, random weights (models/cip_export/bench.py)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    prepare = sub.add_parser("sd15-prepare", help="build + export the full-size SD-1.5 with random weights")
    prepare.add_argument("--dir", required=True, type=Path)
    prepare.add_argument(
        "--ort-optimize",
        action="store_true",
        help="also write DIR/model-opt: the export run through onnxruntime.transformers' fusions",
    )
    bprep = sub.add_parser(
        "blip2-prepare", help="build + export BLIP-2 OPT-2.7b widths, few layers, random weights"
    )
    bprep.add_argument("--dir", required=True, type=Path)
    bprep.add_argument("--text-layers", type=int, default=2)
    bprep.add_argument("--vision-layers", type=int, default=2)
    bprep.add_argument("--qformer-layers", type=int, default=2)
    btime = sub.add_parser("blip2-time", help="time transformers' generate on DIR/source")
    btime.add_argument("--dir", required=True, type=Path)
    btime.add_argument("--batch", type=int, default=8)
    btime.add_argument("--new-tokens", type=int, default=16)
    btime.add_argument("--threads", type=int, default=2)
    btime.add_argument("--repeats", type=int, default=3)
    btime.add_argument("--warmup", type=int, default=1)
    timing = sub.add_parser("sd15-time", help="time diffusers' StableDiffusionPipeline on DIR/source")
    timing.add_argument("--dir", required=True, type=Path)
    timing.add_argument("--prompt", default="a photo of a dog running on the grass in the park")
    timing.add_argument("--steps", type=int, default=4)
    timing.add_argument("--guidance", type=float, default=7.5)
    timing.add_argument("--size", type=int, default=128)
    timing.add_argument("--seed", type=int, default=0)
    timing.add_argument("--threads", type=int, default=2)
    timing.add_argument("--repeats", type=int, default=3)
    timing.add_argument("--warmup", type=int, default=1)


def export(args: argparse.Namespace) -> None:
    if args.bench == "sd15-prepare":
        sd15_prepare(args.dir, ort_optimize=args.ort_optimize)
    elif args.bench == "sd15-time":
        sd15_time(args)
    elif args.bench == "blip2-prepare":
        blip2_prepare(args.dir, args.text_layers, args.vision_layers, args.qformer_layers)
    elif args.bench == "blip2-time":
        blip2_time(args)
    else:  # argparse rejects anything else
        raise SystemExit(f"unknown bench {args.bench}")


# --------------------------------------------------------------------------------------------
# Stable Diffusion 1.5
# --------------------------------------------------------------------------------------------


def build_sd15_pipeline():
    """StableDiffusionPipeline with SD-1.5's module configs (v1-5 unet/vae/text_encoder
    config.json), random weights, the offline CLIP tokenizer and SD-1.5's PNDM scheduler config."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from . import sd
    from .clip_tokenizer import build_clip_tokenizer
    from .sd import SD15_VAE_SCALING_FACTOR

    tokenizer = build_clip_tokenizer(model_max_length=77)
    torch.manual_seed(BENCH_SEED)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        mid_block_scale_factor=1,
        center_input_sample=False,
    )
    torch.manual_seed(BENCH_SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=512,
        scaling_factor=SD15_VAE_SCALING_FACTOR,
    )
    torch.manual_seed(BENCH_SEED + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            # SD-1.5's vocabulary size, so the embedding table has its real size; the offline
            # tokenizer uses the first len(tokenizer) rows only.
            vocab_size=max(49408, len(tokenizer)),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = sd.assemble_pipeline(unet, vae, text_encoder, tokenizer)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    return pipe


def sd15_prepare(directory: Path, *, ort_optimize: bool = False) -> Path:
    import torch

    from . import sd

    directory = Path(directory)
    source = directory / "source"
    model = directory / "model"
    if not (source / "model_index.json").is_file():
        start = time.perf_counter()
        pipe = build_sd15_pipeline()
        partial = directory / "source.partial"
        if partial.exists():
            shutil.rmtree(partial)
        pipe.save_pretrained(str(partial))
        sd._write_json(partial / "scheduler" / "scheduler_config.json", sd.SD15_SCHEDULER_FILE)
        partial.rename(source)
        del pipe
        gc.collect()
        print(f"built and saved {source} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if not (model / "cip-model.toml").is_file():
        start = time.perf_counter()
        torch.set_num_threads(max(1, torch.get_num_threads()))
        pipe = sd.load_pipeline(str(source))
        info = sd.export_pipeline(pipe, model, source=SD_BENCH_SOURCE_NAME)
        del pipe
        gc.collect()
        print(
            f"exported {model} ({info['total_bytes'] / 1e9:.2f} GB, {info['exporters']}, "
            f"{time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
        )
    if ort_optimize and not (directory / "model-opt" / "cip-model.toml").is_file():
        from .ort_optimize import optimize_sd_dir

        optimize_sd_dir(model, directory / "model-opt")
    return model


def sd15_time(args: argparse.Namespace) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    source = Path(args.dir) / "source"
    pipe = StableDiffusionPipeline.from_pretrained(
        str(source), dtype=torch.float32, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    seconds: list[float] = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(
                prompt=args.prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=args.size,
                width=args.size,
                generator=torch.Generator("cpu").manual_seed(args.seed),
                output_type="np",
            )
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "library": "diffusers",
        "version": __import__("diffusers").__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "scheduler": type(pipe.scheduler).__name__,
        "seconds": seconds,
    }
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------
# BLIP-2 OPT-2.7b widths
# --------------------------------------------------------------------------------------------

BLIP2_IMAGE_SIZE = 224
BLIP2_QUERY_TOKENS = 32
OPT_VOCAB_SIZE = 50272
BLIP2_BENCH_SOURCE_NAME = "cip bench: BLIP-2 OPT-2.7b widths, fewer layers, random weights (models/cip_export/bench.py)"


def build_blip2(text_layers: int, vision_layers: int, qformer_layers: int):
    """Salesforce/blip2-opt-2.7b's config at real widths (ViT-g 1408/6144/16 heads at 224 px,
    patch 14; Q-Former 768/3072/12 heads, 32 queries; OPT-2.7b 2560/10240/32 heads, vocab 50272)
    with fewer layers, random weights, and the offline OPT-style tokenizer."""
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    from .gpt2_tokenizer import opt_tokenizer

    tokenizer = opt_tokenizer()
    image_processor = BlipImageProcessor(size={"height": BLIP2_IMAGE_SIZE, "width": BLIP2_IMAGE_SIZE})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=BLIP2_QUERY_TOKENS)
    newline = tokenizer.convert_tokens_to_ids("\u010a")
    text = OPTConfig(
        vocab_size=OPT_VOCAB_SIZE, hidden_size=2560, ffn_dim=10240, num_hidden_layers=text_layers,
        num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=newline, pad_token_id=tokenizer.pad_token_id,
    )
    vision = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=vision_layers,
                               num_attention_heads=16, image_size=BLIP2_IMAGE_SIZE, patch_size=14)
    qformer = Blip2QFormerConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=qformer_layers,
                                 num_attention_heads=12, encoder_hidden_size=1408, cross_attention_frequency=2)
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=BLIP2_QUERY_TOKENS, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(BENCH_SEED)
    model = Blip2ForConditionalGeneration(config).eval().requires_grad_(False)
    return model, processor


def blip2_prepare(directory: Path, text_layers: int, vision_layers: int, qformer_layers: int) -> Path:
    import torch

    from . import blip2

    directory = Path(directory)
    source = directory / "source"
    model_dir = directory / "model"
    if not (source / "config.json").is_file():
        model, processor = build_blip2(text_layers, vision_layers, qformer_layers)
        partial = directory / "source.partial"
        if partial.exists():
            shutil.rmtree(partial)
        model.save_pretrained(str(partial))
        processor.save_pretrained(str(partial))
        partial.rename(source)
        del model
        gc.collect()
    if not (model_dir / "cip-model.toml").is_file():
        start = time.perf_counter()
        model, processor = _load_blip2(source, torch.float32)
        blip2.export_loaded(model, processor, model_dir, dtype="fp32", source=BLIP2_BENCH_SOURCE_NAME)
        print(f"exported {model_dir} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return model_dir


def _load_blip2(source: Path, dtype):
    """Loads the bench source. Not blip2.load: that refuses a tokenizer much smaller than the
    vocabulary (a sign of a broken checkpoint), which this benchmark model has on purpose."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    processor = Blip2Processor.from_pretrained(str(source))
    model = Blip2ForConditionalGeneration.from_pretrained(str(source), dtype=dtype).eval()
    return model, processor


def bench_pixels(batch: int, size: int):
    """Deterministic pixel values in the normalised range; the same formula as cip's bench."""
    import torch

    n = batch * 3 * size * size
    index = torch.arange(n, dtype=torch.float64)
    return torch.sin(index * 0.001).to(torch.float32).reshape(batch, 3, size, size)


def blip2_time(args: argparse.Namespace) -> None:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model, _ = _load_blip2(Path(args.dir) / "source", torch.float32)
    pixels = bench_pixels(args.batch, BLIP2_IMAGE_SIZE)
    seconds: list[float] = []
    lengths: list[int] = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                pixel_values=pixels,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                num_beams=1,
                do_sample=False,
            )
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
            lengths.append(int(out.shape[1]))
    print(json.dumps({
        "library": "transformers",
        "version": transformers.__version__,
        "threads": torch.get_num_threads(),
        "attention": model.config._attn_implementation,
        "output_lengths": lengths,
        "seconds": seconds,
    }))
