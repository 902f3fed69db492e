"""Stable Diffusion -> ONNX in optimum's layout, plus the tiny SD fixture and its references.

Output directory (see models/README.md, "Stable Diffusion"):

    model_index.json                 the diffusers pipeline config
    text_encoder/model.onnx          input_ids int32 [batch, sequence]
                                       -> last_hidden_state [batch, sequence, hidden], pooler_output [batch, hidden]
    unet/model.onnx                  sample [batch, channels, height, width], timestep float32 [batch],
                                     encoder_hidden_states [batch, sequence, hidden] -> out_sample
    vae_decoder/model.onnx           latent_sample [batch, channels, height, width] -> sample [batch, 3, H, W]
    <graph>/model.onnx_data          weights, when a graph is too big for one protobuf (> 2 GB)
    <graph>/config.json              the torch module's config, as optimum writes it
    tokenizer/                       tokenizer.json, vocab.json, merges.txt, tokenizer_config.json,
                                     special_tokens_map.json
    scheduler/scheduler_config.json
    cip-model.toml                   manifest (common.write_manifest)

Decisions the Rust side relies on:
- `timestep` is float32 in every dtype. Euler-type schedulers use fractional timesteps, and fp16
  cannot even hold them (its spacing is 0.5 between 512 and 1024). The UNet computes its sinusoidal
  embedding in float32 and casts it to the model dtype itself.
- `latent_sample` is the latent already divided by `vae_scaling_factor`, as in optimum.
- In fp16 exports every other float tensor (inputs and outputs) is float16; `input_ids` is int32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import common

DEFAULT_SOURCE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_OPSET = 20  # torch 2.14's dynamo exporter default: no version conversion pass needed.

# One ONNX protobuf cannot exceed 2 GiB. Stay clear of it: weights over this go to model.onnx_data.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
EXTERNAL_DATA_NAME = "model.onnx_data"

GRAPH_IO = {
    "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
    "vae_decoder": (["latent_sample"], ["sample"]),
}

# cip's scheduler names -> (diffusers class name, config overrides). The same table the Rust side
# implements; the references record the full resulting config of each.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help=f"hub id or a local directory saved with save_pretrained (default: {DEFAULT_SOURCE})",
    )
    parser.add_argument("--out", required=True, type=Path, help="output model directory (replaced if it exists)")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device to trace on, e.g. cuda (faster for the real SD-1.5)",
    )
    parser.add_argument(
        "--source-name",
        default=None,
        help="what cip-model.toml records as the source (default: --source as given)",
    )
    parser.add_argument("--variant", default=None, help='weights variant to load from the hub, e.g. "fp16"')
    parser.add_argument(
        "--exporter",
        choices=["auto", "dynamo", "torchscript"],
        default="auto",
        help="auto: torch.export-based (dynamo) exporter, falling back to TorchScript if it fails",
    )
    parser.add_argument(
        "--external-data",
        choices=["auto", "always", "never"],
        default="auto",
        help=f"store weights in <graph>/{EXTERNAL_DATA_NAME}: auto = only when a graph is over "
        f"{EXTERNAL_DATA_THRESHOLD_BYTES / 1e9:.1f} GB",
    )


def export(args: argparse.Namespace) -> None:
    pipe = load_pipeline(args.source, variant=args.variant)
    info = export_pipeline(
        pipe,
        Path(args.out),
        dtype=args.dtype,
        opset=args.opset,
        device=args.device,
        source=args.source_name or args.source,
        exporter=args.exporter,
        external_data=args.external_data,
    )
    for role, used in info["exporters"].items():
        print(f"{role}: exported with the {used} exporter")
    print(f"wrote {args.out} ({info['total_bytes'] / 1e6:.1f} MB)")


# --------------------------------------------------------------------------------------------
# Loading and exporting
# --------------------------------------------------------------------------------------------


def load_pipeline(source: str, variant: str | None = None):
    """A StableDiffusionPipeline in float32 on the CPU, without the safety checker.

    fp32 first, whatever the export dtype: the cast to fp16 happens per module at export time, so a
    fp16 export from fp32 weights and from an fp16 variant go through one path.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    local = Path(source).expanduser()
    looks_like_path = source.startswith((".", "/", "~")) or local.exists()
    if looks_like_path and not (local / "model_index.json").is_file():
        raise SystemExit(
            f"--source {source}: no model_index.json there. A local source is a directory written by "
            f"StableDiffusionPipeline.save_pretrained (model_index.json, unet/, vae/, text_encoder/, ...)."
        )
    kwargs: dict[str, Any] = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if variant:
        kwargs["variant"] = variant
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local) if looks_like_path else source, dtype=torch.float32, **kwargs
        )
    except OSError as e:
        if os.environ.get("HF_HUB_OFFLINE") == "1" and not looks_like_path:
            raise SystemExit(
                f"--source {source}: not in the local Hugging Face cache and the tool is offline. "
                f"Pass --online (export.py --online sd ...) on a machine with network access.\n({e})"
            ) from None
        raise
    tokenizer = pipe.tokenizer
    # transformers 5 can return an empty tokenizer without an error (pitfalls.md).
    if len(tokenizer) <= 512 or tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise SystemExit(
            f"the tokenizer loaded from {source!r} has {len(tokenizer)} tokens and bos/eos "
            f"{tokenizer.bos_token_id}/{tokenizer.eos_token_id}: it did not load. Check that "
            f"{source}/tokenizer holds vocab.json and merges.txt (or tokenizer.json)."
        )
    return pipe


def _wrappers():
    """The graph-boundary modules, defined inside a function so importing this module stays cheap."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, text_encoder):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids):
            # int32 ids at the boundary (what tokenizers hand out, half the bytes); embedding wants int64.
            out = self.text_encoder(input_ids.to(torch.int64), return_dict=False)
            return out[0], out[1]

    class UNet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample, return_dict=False)[0]

    return TextEncoder, UNet, VaeDecoder


def export_pipeline(
    pipe,
    out_dir: Path,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    device: str = "cpu",
    source: str,
    exporter: str = "auto",
    external_data: str = "auto",
) -> dict[str, Any]:
    """Write the model directory for `pipe` to out_dir. Returns which exporter made each graph.

    The directory is built as `<out_dir>.partial` and renamed when complete, so a crash never leaves
    something that looks like a model. An existing out_dir is replaced only if it is a cip model
    directory (has cip-model.toml): --out pointing at anything else is refused, not deleted.
    """
    import torch

    final_dir = Path(out_dir)
    if final_dir.exists() and any(final_dir.iterdir()) and not (final_dir / common.MANIFEST).exists():
        raise SystemExit(
            f"--out {final_dir}: exists, is not empty and holds no {common.MANIFEST}; refusing to replace it. "
            f"Choose a new directory or remove it yourself."
        )
    work_dir = final_dir.with_name(final_dir.name + ".partial")
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    TextEncoder, UNet, VaeDecoder = _wrappers()
    text_cfg = pipe.text_encoder.config
    unet_cfg = pipe.unet.config
    vae_cfg = pipe.vae.config
    tokenizer = pipe.tokenizer

    # Dummy inputs: batch 2 (a CFG pair) and a latent that is not square, so no axis is specialised
    # by accident to an equal neighbour.
    batch = 2
    seq = tokenizer.model_max_length
    lat_h, lat_w = _dummy_latent_hw(unet_cfg)
    channels = unet_cfg.in_channels
    ids = tokenizer(
        ["a photo of a dog", "a photo of a cat"], padding="max_length", max_length=seq, truncation=True,
        return_tensors="pt",
    ).input_ids.to(torch.int32)
    graphs = {
        "text_encoder": (
            TextEncoder(pipe.text_encoder),
            (ids.to(device),),
            {"input_ids": {0: "batch", 1: "sequence"}},
            {"last_hidden_state": {0: "batch", 1: "sequence"}, "pooler_output": {0: "batch"}},
        ),
        "unet": (
            UNet(pipe.unet),
            (
                torch.randn(batch, channels, lat_h, lat_w, dtype=torch_dtype, device=device),
                torch.tensor([981.0, 961.5][:batch], dtype=torch.float32, device=device),
                torch.randn(batch, seq, text_cfg.hidden_size, dtype=torch_dtype, device=device),
            ),
            {
                "sample": {0: "batch", 2: "height", 3: "width"},
                "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch", 1: "sequence"},
            },
            {"out_sample": {0: "batch", 2: "height", 3: "width"}},
        ),
        "vae_decoder": (
            VaeDecoder(pipe.vae),
            (torch.randn(1, vae_cfg.latent_channels, lat_h, lat_w, dtype=torch_dtype, device=device),),
            {"latent_sample": {0: "batch", 2: "height", 3: "width"}},
            {"sample": {0: "batch", 2: "image_height", 3: "image_width"}},
        ),
    }
    used: dict[str, str] = {}
    for role, (module, args, in_axes, out_axes) in graphs.items():
        module = module.to(device=device, dtype=torch_dtype).eval()
        module.requires_grad_(False)
        in_names, out_names = GRAPH_IO[role]
        used[role] = export_graph(
            module,
            args,
            in_names,
            out_names,
            {**in_axes, **out_axes},
            work_dir / role / "model.onnx",
            opset=opset,
            exporter=exporter,
            external_data=external_data,
        )
        # Modules go back to fp32 on the CPU: the caller may still use the pipeline.
        module.to(device="cpu", dtype=torch.float32)

    _write_json(work_dir / "text_encoder" / "config.json", _clean_config(text_cfg.to_dict()))
    _write_json(work_dir / "unet" / "config.json", _clean_config(dict(unet_cfg)))
    _write_json(work_dir / "vae_decoder" / "config.json", _clean_config(dict(vae_cfg)))
    _write_json(work_dir / "model_index.json", _clean_config(dict(pipe.config)) | {"_class_name": type(pipe).__name__})
    _write_json(work_dir / "scheduler" / "scheduler_config.json", scheduler_file_config(pipe.scheduler))
    from .clip_tokenizer import save_tokenizer_files

    save_tokenizer_files(tokenizer, work_dir / "tokenizer")

    common.write_manifest(
        work_dir,
        family="sd",
        dtype=dtype,
        source=source,
        graphs={role: f"{role}/model.onnx" for role in GRAPH_IO},
        config=manifest_config(pipe),
    )
    total = sum(p.stat().st_size for p in work_dir.rglob("*") if p.is_file())
    if final_dir.exists():
        shutil.rmtree(final_dir)
    work_dir.rename(final_dir)
    return {"exporters": used, "total_bytes": total}


def manifest_config(pipe) -> dict[str, Any]:
    """The manifest's [config] table: what the Rust pipeline needs besides the graphs."""
    vae_cfg, unet_cfg, tok = pipe.vae.config, pipe.unet.config, pipe.tokenizer
    sample_size = unet_cfg.sample_size
    if not isinstance(sample_size, int):
        sample_size = list(sample_size)
    return {
        "vae_scaling_factor": float(vae_cfg.scaling_factor),
        "vae_scale_factor": 2 ** (len(vae_cfg.block_out_channels) - 1),
        "latent_channels": int(unet_cfg.in_channels),
        "unet_sample_size": sample_size,
        "text_max_length": int(tok.model_max_length),
        "pad_token_id": int(tok.pad_token_id),
        "bos_token_id": int(tok.bos_token_id),
        "eos_token_id": int(tok.eos_token_id),
        "text_hidden_size": int(pipe.text_encoder.config.hidden_size),
        "default_scheduler": type(pipe.scheduler).__name__,
        "prediction_type": str(pipe.scheduler.config.get("prediction_type", "epsilon")),
        "timestep_dtype": "float32",
    }


def scheduler_file_config(scheduler) -> dict[str, Any]:
    """The scheduler config as the source's file had it: keys the source left out stay out.

    diffusers' from_config gives a *different* scheduler class its own defaults for keys that the
    loaded file did not set (`_use_default_values`): SD-1.5's file has no timestep_spacing, so PNDM
    uses "leading" and Euler "linspace". Writing every key would silently change that, so write only
    the explicit ones; a reader fills in the rest with the chosen class's defaults.
    """
    config = dict(scheduler.config)
    defaulted = set(config.get("_use_default_values", []))
    out = {k: v for k, v in config.items() if not k.startswith("_") and k not in defaulted}
    out["_class_name"] = type(scheduler).__name__
    return dict(sorted(out.items()))


def explicit_scheduler_config(scheduler) -> dict[str, Any]:
    """Every config value the scheduler object really uses (defaults filled in), for references."""
    out = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    out["_class_name"] = type(scheduler).__name__
    return json.loads(json.dumps(dict(sorted(out.items())), default=_json_default))


def _dummy_latent_hw(unet_cfg) -> tuple[int, int]:
    size = unet_cfg.sample_size
    h = size if isinstance(size, int) else size[0]
    # Any multiple of the UNet's total downsampling works; make width differ from height.
    factor = 2 ** (len(unet_cfg.block_out_channels) - 1)
    return h, h + factor


def _clean_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Drop entries that depend on where the source was loaded from, so exports are reproducible."""
    dropped = ("_name_or_path", "_commit_hash", "_use_default_values")
    return {k: v for k, v in sorted(cfg.items()) if k not in dropped}


def _write_json(path: Path, obj: Any) -> None:
    """Indented, sorted JSON, with lists of numbers kept on one line (token ids stay readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite_json(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    path.write_text(text + "\n", encoding="utf-8")


_NUMBER_LIST = re.compile(r"\[\s*((?:-?[\d.eE+-]+,\s*)*-?[\d.eE+-]+)\s*\]")


def _finite_json(value: Any) -> Any:
    """JSON has no infinity or NaN (Python's "-Infinity" is not JSON; serde_json rejects it).
    Write them as the strings "inf", "-inf", "nan" (e.g. DPM-Solver's lambda_min_clipped = -inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def parse_config_floats(config: dict[str, Any]) -> dict[str, Any]:
    """Inverse of the string encoding of non-finite floats, for feeding a config back to diffusers."""
    special = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
    return {k: special.get(v, v) if isinstance(v, str) else v for k, v in config.items()}


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# --------------------------------------------------------------------------------------------
# One graph
# --------------------------------------------------------------------------------------------


def export_graph(
    module,
    args: tuple,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    path: Path,
    *,
    opset: int,
    exporter: str = "auto",
    external_data: str = "auto",
) -> str:
    """Export one module to path; returns the exporter used ("dynamo" or "torchscript").

    Both exporters end in the same save step (_save_ir): node metadata stripped, weights inline or
    in one `model.onnx_data` file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if exporter in ("auto", "dynamo"):
        try:
            model = _export_dynamo(module, args, input_names, output_names, dynamic_axes, opset)
            _save_ir(model, path, external_data, dynamic_axes)
            return "dynamo"
        except Exception as e:  # noqa: BLE001 - any exporter failure moves on to the fallback
            if exporter == "dynamo":
                raise
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            print(
                f"{path.parent.name}: the dynamo exporter failed ({type(e).__name__}: {reason}); "
                f"falling back to the TorchScript exporter",
                file=sys.stderr,
            )
    model = _export_torchscript(module, args, input_names, output_names, dynamic_axes, opset)
    _save_ir(model, path, external_data, dynamic_axes)
    return "torchscript"


def _export_dynamo(module, args, input_names, output_names, dynamic_axes, opset):
    import warnings

    import torch

    with warnings.catch_warnings():
        # dynamic_axes is the documented compatibility route and names the symbolic dims for us;
        # its "prefer dynamic_shapes" notices are noise here.
        warnings.filterwarnings("ignore", message=".*dynamic_axes.*")
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        program = torch.onnx.export(
            module,
            args,
            f=None,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    return program.model


def _export_torchscript(module, args, input_names, output_names, dynamic_axes, opset):
    import onnx_ir as ir
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module,
            args,
            str(tmp_path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
        model = ir.load(str(tmp_path))
        # Pull external tensors into memory before the temporary directory goes away.
        for value in model.graph.initializers.values():
            if value.const_value is not None:
                value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    return model


def _save_ir(model, path: Path, external_data: str, dynamic_axes) -> None:
    """Save without exporter metadata (source paths and stack traces differ per machine, and would
    make fixtures irreproducible), with external data when needed or asked.

    Graph outputs get the declared axis names: the dynamo exporter writes the expressions it
    derived instead (e.g. the UNet's "2*(((height - 1)//2)) + 2", which equals height for every
    valid input), and the manifest should say what a caller can rely on.
    """
    import onnx_ir as ir

    for value in model.graph.outputs:
        axes = dynamic_axes.get(value.name, {})
        if value.shape is not None and axes:
            value.shape = ir.Shape([axes.get(i, d) for i, d in enumerate(value.shape.dims)])

    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        node.doc_string = None
        for value in node.outputs:
            value.metadata_props.clear()
            value.doc_string = None
    for value in list(model.graph.inputs) + list(model.graph.outputs) + list(model.graph.initializers.values()):
        value.metadata_props.clear()
        value.doc_string = None
    model.graph.metadata_props.clear()
    model.metadata_props.clear()
    model.doc_string = None

    weight_bytes = sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )
    use_external = external_data == "always" or (
        external_data == "auto" and weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES
    )
    if use_external:
        ir.save(model, str(path), external_data=EXTERNAL_DATA_NAME, size_threshold_bytes=1024)
    else:
        ir.save(model, str(path))


# --------------------------------------------------------------------------------------------
# Tiny fixture
# --------------------------------------------------------------------------------------------

# SD-1.5's scheduler config (its scheduler/scheduler_config.json), the pipeline default.
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "clip_sample": False,
}
SD15_VAE_SCALING_FACTOR = 0.18215
FIXTURE_SEED = 1234


def build_tiny_pipeline():
    """A random-weight StableDiffusionPipeline of the real classes, tiny widths (~1.4 MB fp32).

    Same structure as SD-1.5 (cross-attention down/up blocks, a cross-attention mid block, a KL VAE
    with an attention mid block, a CLIP text transformer with quick_gelu), two resolution levels each.
    Deterministic: seeded per module.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .clip_tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(model_max_length=77)
    hidden = 32
    torch.manual_seed(FIXTURE_SEED)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    torch.manual_seed(FIXTURE_SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=SD15_VAE_SCALING_FACTOR,
    )
    torch.manual_seed(FIXTURE_SEED + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return assemble_pipeline(unet, vae, text_encoder, tokenizer)


def assemble_pipeline(unet, vae, text_encoder, tokenizer):
    """The modules as SD-1.5's StableDiffusionPipeline (PNDM, no safety checker), in eval mode."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    # from_config keeps clip_sample, which PNDM ignores but DDIM (built from this config) reads.
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for module in (unet, vae, text_encoder):
        module.eval()
    return pipe


FIXTURE_SOURCE_NAME = "cip tiny random-weight SD (models/cip_export/sd.py::build_tiny_pipeline)"
# SD-1.5's scheduler/scheduler_config.json on the hub, verbatim. The tiny source gets this file
# instead of the one save_pretrained writes (which spells out every default), so that schedulers
# built from it with from_config get the same defaults as with the real model.
SD15_SCHEDULER_FILE = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **SD15_SCHEDULER_CONFIG}


def save_tiny_source(directory: Path) -> Path:
    """The tiny pipeline saved with save_pretrained: what a user's local --source looks like."""
    pipe = build_tiny_pipeline()
    directory = Path(directory)
    pipe.save_pretrained(str(directory))
    _write_json(directory / "scheduler" / "scheduler_config.json", SD15_SCHEDULER_FILE)
    return directory


def make_fixture(root: Path) -> None:
    """tests/fixtures/sd-tiny (exported by this module's CLI path from a save_pretrained directory),
    tests/fixtures/sd-tiny-fp16 (the same, --dtype fp16) and tests/fixtures/reference/sd
    (diffusers' own outputs for that pipeline, in fp32)."""
    import torch

    root = Path(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible reductions
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source = save_tiny_source(Path(tmp) / "tiny-sd")
            parser = argparse.ArgumentParser(prog="export.py sd")
            add_arguments(parser)
            args = parser.parse_args(
                ["--source", str(source), "--out", str(root / "sd-tiny"), "--source-name", FIXTURE_SOURCE_NAME]
            )
            export(args)
            # The same weights exported in fp16: the Rust fp16 path (GPU dtype) is tested on the
            # CPU against the fp32 references with a tolerance.
            args = parser.parse_args(
                ["--source", str(source), "--out", str(root / "sd-tiny-fp16"), "--dtype", "fp16",
                 "--source-name", FIXTURE_SOURCE_NAME]
            )
            export(args)
            write_references(load_pipeline(str(source)), root / "reference" / "sd")
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Reference outputs
# --------------------------------------------------------------------------------------------

PROMPT = "a photo of tench, a fish held by a man in a green jacket next to a river"
NEGATIVE_PROMPT = "blurry, low quality, watermark"
# Over 77 tokens: diffusers truncates it (and logs a warning); so must cip.
LONG_PROMPT = (
    "a photo of church, a white building with a tall tower under a blue sky, a person flying with a "
    "colorful parachute over the sea, a red pump at a station at night, a large truck parked on the "
    "street of a city, a small white ball on the green near the hole, two birds standing in the water, "
    "a dog running on the grass in the park, a golden instrument played by a woman on a stage"
)
REFERENCE_STEPS = 8
INTERMEDIATES_CASE = "pndm-g7.5-neg-s0"


def reference_cases(height: int, width: int) -> list[dict[str, Any]]:
    cases = []

    def add(scheduler, guidance, negative, seed, prompt=PROMPT, h=height, w=width, tag=""):
        neg = "neg" if negative else "noneg"
        case_id = f"{scheduler}-g{guidance}-{neg}-s{seed}{tag}"
        cases.append(
            {
                "id": case_id,
                "prompt": prompt,
                "negative_prompt": negative,
                "seed": seed,
                "steps": REFERENCE_STEPS,
                "scheduler": scheduler,
                "guidance": guidance,
                "height": h,
                "width": w,
                "file": case_id.replace("+", "p") + ".png",
            }
        )

    for scheduler in SCHEDULERS:
        for guidance in (1.0, 7.5):
            for negative in (None, NEGATIVE_PROMPT):
                add(scheduler, guidance, negative, 0)
    for seed in (1, 2024):
        add("pndm", 7.5, None, seed)
    add("pndm", 7.5, None, 0, prompt=LONG_PROMPT, tag="-long")
    # Not square, to pin which axis is height.
    add("euler-a", 7.5, NEGATIVE_PROMPT, 3, h=height, w=width + 8, tag="-wide")
    return cases


def make_scheduler(name: str, base_config):
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


def _prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids exactly as the pipeline's encode_prompt makes them."""
    return tokenizer(
        text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids


def write_references(pipe, out_dir: Path) -> list[dict[str, Any]]:
    """Run diffusers for every case; write PNGs, index.json and one case's intermediates."""
    import torch

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    tokenizer = pipe.tokenizer
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size * vae_scale
    cases = reference_cases(size, size)
    for case in cases:
        pipe.scheduler = make_scheduler(case["scheduler"], base_config)
        case["scheduler_config"] = explicit_scheduler_config(pipe.scheduler)
        cfg = case["guidance"] > 1.0
        case["prompt_ids"] = _prompt_ids(tokenizer, case["prompt"])
        case["negative_prompt_ids"] = _prompt_ids(tokenizer, case["negative_prompt"] or "") if cfg else None
        case["prompt_truncated"] = len(tokenizer(case["prompt"]).input_ids) > tokenizer.model_max_length
        recorder = _Recorder(pipe) if case["id"] == INTERMEDIATES_CASE else None
        with torch.no_grad():
            result = pipe(
                prompt=case["prompt"],
                negative_prompt=case["negative_prompt"],
                num_inference_steps=case["steps"],
                guidance_scale=case["guidance"],
                height=case["height"],
                width=case["width"],
                generator=torch.Generator("cpu").manual_seed(case["seed"]),
                output_type="pil",
                **(recorder.pipeline_kwargs() if recorder else {}),
            )
        result.images[0].save(out_dir / case["file"], format="PNG")
        if recorder:
            recorder.finish(case, out_dir / "intermediates.safetensors")

    index = {
        "model": "sd-tiny",
        "noise": "initial latents = torch.randn([1, latent_channels, height / vae_scale_factor, width / "
        "vae_scale_factor], generator=torch.Generator('cpu').manual_seed(seed)) * init_noise_sigma; "
        "euler-a then draws its per-step noise from the same generator",
        "image": "PNG of round(clamp(decoded / 2 + 0.5, 0, 1) * 255), as diffusers' output_type='pil'",
        "guidance": "classifier-free guidance only when guidance > 1; the negative prompt is ignored otherwise",
        "scheduler_config": "every value the diffusers scheduler used; non-finite floats are the strings "
        "'inf', '-inf', 'nan' (JSON has none)",
        "cases": cases,
        "intermediates": {
            "case": INTERMEDIATES_CASE,
            "file": "intermediates.safetensors",
            "tensors": _Recorder.DESCRIPTION,
        },
    }
    _write_json(out_dir / "index.json", index)
    return cases


class _Recorder:
    """Captures one pipeline call's internals through hooks, for debugging a port step by step."""

    DESCRIPTION = {
        "prompt_ids": "int32 [1, 77], the text encoder input for the prompt",
        "negative_prompt_ids": "int32 [1, 77], the text encoder input for the negative prompt",
        "prompt_embeds": "float32 [1, 77, hidden], text encoder last_hidden_state for the prompt",
        "negative_prompt_embeds": "float32 [1, 77, hidden], the same for the negative prompt",
        "noise": "float32 [1, C, h, w], torch.randn from the seeded CPU generator",
        "initial_latents": "noise * scheduler.init_noise_sigma",
        "timesteps": "the scheduler's timesteps, one per UNet call, in its own dtype",
        "unet_sample_step_{i}": "UNet input `sample` at call i ([uncond, cond] batch, scaled)",
        "unet_timestep_step_{i}": "UNet input timestep at call i (float32 scalar)",
        "unet_out_step_{i}": "UNet output at call i ([uncond, cond])",
        "latents_step_{i}": "latents after the scheduler step of call i",
        "final_latents": "latents after the last step",
        "decoded": "float32 [1, 3, H, W], vae_decoder output for final_latents / vae_scaling_factor",
    }

    def __init__(self, pipe):
        self.pipe = pipe
        self.unet_inputs: list[tuple[Any, Any, Any]] = []
        self.unet_outputs: list[Any] = []
        self.latents: list[Any] = []
        self.handles = [
            pipe.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            pipe.unet.register_forward_hook(self._post_hook),
        ]

    def _pre_hook(self, module, args, kwargs):
        sample, timestep = args[0], args[1]
        self.unet_inputs.append((sample.clone(), timestep.clone(), kwargs["encoder_hidden_states"].clone()))

    def _post_hook(self, module, args, output):
        self.unet_outputs.append(output[0].clone())

    def _on_step_end(self, pipe, step, timestep, tensors):
        self.latents.append(tensors["latents"].clone())
        return {}

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"callback_on_step_end": self._on_step_end, "callback_on_step_end_tensor_inputs": ["latents"]}

    def finish(self, case: dict[str, Any], path: Path) -> None:
        import torch
        from safetensors.torch import save_file

        for handle in self.handles:
            handle.remove()
        pipe = self.pipe
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        shape = (1, pipe.unet.config.in_channels, case["height"] // factor, case["width"] // factor)
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(case["seed"]))
        initial = noise * pipe.scheduler.init_noise_sigma
        # The contract cip's noise module implements: the pipeline's first latents are exactly this.
        # (This case is PNDM, whose scale_model_input is the identity, so the UNet saw them as is.)
        assert case["scheduler"] == "pndm"
        assert torch.equal(initial, self.unet_inputs[0][0][:1]), "initial latents != torch.randn of the seed"
        hidden = self.unet_inputs[0][2]
        tensors = {
            "prompt_ids": torch.tensor([case["prompt_ids"]], dtype=torch.int32),
            "negative_prompt_ids": torch.tensor([case["negative_prompt_ids"]], dtype=torch.int32),
            "negative_prompt_embeds": hidden[:1],
            "prompt_embeds": hidden[1:],
            "noise": noise,
            "initial_latents": initial,
            "timesteps": pipe.scheduler.timesteps.clone(),
            "final_latents": self.latents[-1],
        }
        for i, ((sample, timestep, _), out, latents) in enumerate(zip(self.unet_inputs, self.unet_outputs, self.latents)):
            tensors[f"unet_sample_step_{i}"] = sample
            tensors[f"unet_timestep_step_{i}"] = torch.as_tensor(timestep, dtype=torch.float32).reshape(())
            tensors[f"unet_out_step_{i}"] = out
            tensors[f"latents_step_{i}"] = latents
        with torch.no_grad():
            tensors["decoded"] = pipe.vae.decode(self.latents[-1] / pipe.vae.config.scaling_factor).sample
        save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path), metadata={"case": case["id"]})
