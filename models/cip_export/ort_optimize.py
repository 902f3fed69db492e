"""ONNX Runtime's transformer fusions (onnxruntime.transformers.optimizer) over an exported SD
directory, for the CPU provider.

The fusions rewrite attention subgraphs into com.microsoft MultiHeadAttention / Attention, and
LayerNorm / GELU chains into single ops. Several of the unet fusions produce ops that only the CUDA
provider implements (GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, NhwcConv, packed QKV/KV
attention), so those are switched off here: the result must run on the CPU provider.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from . import common

# role -> the optimizer's model_type
SD_MODEL_TYPES = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae"}


def cpu_fusion_options(model_type: str):
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    for cuda_only in (
        "enable_group_norm",
        "enable_skip_group_norm",
        "enable_bias_splitgelu",
        "enable_packed_qkv",
        "enable_packed_kv",
        "enable_bias_add",
        "enable_nhwc_conv",
    ):
        setattr(options, cuda_only, False)
    return options


def optimize_graph(src: Path, dst: Path, model_type: str) -> dict[str, int]:
    """Fuse one graph; returns the optimizer's fused-op counts."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(
        str(src),
        model_type=model_type,
        num_heads=0,
        hidden_size=0,
        opt_level=0,  # the Python fusions only; ORT's own graph optimiser runs at session load
        optimization_options=cpu_fusion_options(model_type),
        use_gpu=False,
        only_onnxruntime=False,
    )
    dst.parent.mkdir(parents=True, exist_ok=True)
    big = sum(t.ByteSize() for t in model.model.graph.initializer) > 1_800_000_000
    model.save_model_to_file(str(dst), use_external_data_format=big, all_tensors_to_one_file=True)
    if big:
        # save_model_to_file names the data file after the model; cip expects model.onnx_data.
        produced = dst.with_name(dst.name + ".data")
        if produced.exists() and not (dst.parent / "model.onnx_data").exists():
            proto = onnx.load(str(dst), load_external_data=False)
            for tensor in proto.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = "model.onnx_data"
            produced.rename(dst.parent / "model.onnx_data")
            onnx.save_model(proto, str(dst))
    return model.get_fused_operator_statistics()


def optimize_sd_dir(src: Path, dst: Path) -> Path:
    """Copy an SD model directory to dst with every graph fused; rewrite its manifest."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib

    src, dst = Path(src), Path(dst)
    manifest = tomllib.loads((src / common.MANIFEST).read_text())
    partial = dst.with_name(dst.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    shutil.copytree(src, partial, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data", common.MANIFEST))
    for role, model_type in SD_MODEL_TYPES.items():
        start = time.perf_counter()
        rel = manifest["graphs"][role]["path"]
        stats = optimize_graph(src / rel, partial / rel, model_type)
        fused = {k: v for k, v in stats.items() if v}
        print(f"{role}: fused {fused} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    common.write_manifest(
        partial,
        family=manifest["family"],
        dtype=manifest["dtype"],
        source=manifest["source"] + " + onnxruntime.transformers fusions (CPU)",
        graphs={role: manifest["graphs"][role]["path"] for role in SD_MODEL_TYPES},
        config=manifest["config"],
    )
    if dst.exists():
        shutil.rmtree(dst)
    partial.rename(dst)
    return dst
