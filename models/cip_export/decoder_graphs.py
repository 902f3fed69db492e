"""Pieces shared by the captioner exporters (BLIP-2, ViT-GPT2): attention with a key/value cache,
ONNX export with readable dynamic dimensions, and the facts both manifests record.

The decoders are written here as plain tensor code over the Hugging Face modules' weights instead of
tracing the modules themselves. transformers 5's cache objects and mask builders branch on data
(e.g. "is the mask all ones?"), which torch.export either rejects or freezes into the graph; an
explicit step function gives one graph that serves every step, past length 0 included. The tests
check these graphs against transformers' own forward and `generate`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

# Above this many bytes of weights a graph keeps them in `model.onnx.data` (protobuf caps one file
# at 2 GiB). The tiny fixtures stay single-file.
EXTERNAL_DATA_THRESHOLD = 1 << 30

OPSET = 18


def causal_padding_mask(attention_mask: torch.Tensor, query_len: int | torch.SymInt) -> torch.Tensor:
    """Boolean [batch, 1, query, key]: key j is visible to query i iff j <= past + i and mask[j] == 1.

    `attention_mask` covers past and new tokens ([batch, past + query]); the queries are its last
    `query_len` positions.
    """
    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = torch.arange(query_len, device=attention_mask.device) + (total - query_len)
    causal = key_pos[None, :] <= query_pos[:, None]  # [query, key]
    padding = attention_mask.to(torch.bool)[:, None, None, :]  # [batch, 1, 1, key]
    return causal[None, None, :, :] & padding


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Scaled dot-product attention, softmax in float32 (as transformers' eager path does).

    Hidden keys get the float32 minimum instead of -inf, so a query that sees no key at all (a
    padding position) yields a uniform average rather than NaN: NaN in a padding row's keys/values
    would otherwise leak into every later step through the cache.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)).to(torch.float32) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]."""
    batch, seq, width = x.shape
    return x.view(batch, seq, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]."""
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def export_graph(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dims: dict[str, Sequence[str | int]],
) -> Path:
    """Export `module(*args)` to ONNX at `path` with every dimension of `dims` symbolic.

    dims maps each input and output name to its dimension labels: a string is a named dynamic
    dimension, an int a fixed size. torch.export names dynamic sizes itself (s0, s1 + s2, ...), so
    the labels are written back onto the graph's inputs and outputs afterwards: the manifest and
    the Rust side see `batch`, `sequence`, `past_sequence`, ...
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat_inputs = _flatten(args)
    if len(flat_inputs) != len(input_names):
        raise ValueError(f"{len(flat_inputs)} example inputs but {len(input_names)} input names")
    dynamic_shapes = _dynamic_shapes(args, iter(input_names), dims)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            optimize=True,
        )
    # Save first (with external data for big graphs: protobuf cannot hold more than 2 GiB), then
    # rewrite only the graph's proto; the weights stay where the first save put them.
    program.save(str(path), external_data=external)
    model = onnx.load(str(path), load_external_data=False)
    _label_dims(model, dims)
    _strip_metadata(model)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def _strip_metadata(model) -> None:
    """Drop the exporter's per-node stack traces and source paths.

    They hold absolute paths of this machine (fixtures must be byte-for-byte reproducible anywhere)
    and made up three quarters of a tiny graph's bytes.
    """

    def clean_graph(graph) -> None:
        graph.doc_string = ""
        del graph.metadata_props[:]
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            value.doc_string = ""
            del value.metadata_props[:]
        for init in graph.initializer:
            del init.metadata_props[:]
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    clean_graph(attr.g)
                for sub in attr.graphs:
                    clean_graph(sub)

    model.doc_string = ""
    del model.metadata_props[:]
    clean_graph(model.graph)
    for function in model.functions:
        function.doc_string = ""
        del function.metadata_props[:]
        for node in function.node:
            node.doc_string = ""
            del node.metadata_props[:]


def _flatten(args: Any) -> list[torch.Tensor]:
    if isinstance(args, torch.Tensor):
        return [args]
    out: list[torch.Tensor] = []
    for a in args:
        out.extend(_flatten(a))
    return out


def _dynamic_shapes(args: Any, names, dims: dict[str, Sequence[str | int]]) -> Any:
    """Mirror the args structure; every labelled dimension becomes Dim.AUTO.

    AUTO (not named Dims) because some sizes are sums of others (attention_mask = past + sequence),
    which named Dims cannot state; export infers those relations itself.
    """
    from torch.export import Dim

    if isinstance(args, torch.Tensor):
        labels = dims[next(names)]
        return {i: Dim.AUTO for i, label in enumerate(labels) if isinstance(label, str)}
    return type(args)(_dynamic_shapes(a, names, dims) for a in args)


def _label_dims(model, dims: dict[str, Sequence[str | int]]) -> None:
    for value in list(model.graph.input) + list(model.graph.output):
        labels = dims.get(value.name)
        if labels is None:
            raise ValueError(f"no dimension labels for graph value {value.name!r}")
        shape = value.type.tensor_type.shape
        if len(shape.dim) != len(labels):
            raise ValueError(f"{value.name}: graph rank {len(shape.dim)}, labels {labels}")
        for dim, label in zip(shape.dim, labels):
            if isinstance(label, str):
                dim.Clear()
                dim.dim_param = label
            else:
                if dim.HasField("dim_value") and dim.dim_value != label:
                    raise ValueError(f"{value.name}: fixed size {dim.dim_value}, expected {label}")
                dim.Clear()
                dim.dim_value = label


def prepare_out_dir(out: Path) -> Path:
    """A fresh output directory. A previous export (it has a manifest) is replaced; any other
    non-empty directory is refused rather than deleted."""
    import shutil

    from .common import MANIFEST

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise ValueError(f"--out {out} exists, is not empty and holds no {MANIFEST}: "
                             "give a new or empty directory (cip never deletes files it did not write)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def torch_dtype(name: str) -> torch.dtype:
    try:
        return {"fp32": torch.float32, "fp16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown --dtype {name!r}: use fp32 or fp16") from None


def generation_defaults(config) -> dict[str, Any]:
    """The generation settings `generate` falls back to when a call does not set them.

    Fields the model's generation config leaves unset take transformers' global defaults, as
    `generate` does. Token ids are normalised to lists (transformers accepts an int or a list).
    """
    import copy

    effective = copy.deepcopy(config)
    effective.update(**config._get_default_generation_params(), defaults_only=True)

    def ids(value):
        if value is None:
            return None
        return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]

    return {
        "max_length": effective.max_length,
        "max_new_tokens": effective.max_new_tokens,
        "min_length": effective.min_length,
        "min_new_tokens": effective.min_new_tokens,
        "num_beams": effective.num_beams,
        "length_penalty": float(effective.length_penalty),
        "early_stopping": effective.early_stopping,
        "repetition_penalty": float(effective.repetition_penalty),
        "no_repeat_ngram_size": effective.no_repeat_ngram_size,
        "do_sample": effective.do_sample,
        "num_return_sequences": effective.num_return_sequences,
        "eos_token_id": ids(effective.eos_token_id),
        "pad_token_id": effective.pad_token_id,
        "bos_token_id": effective.bos_token_id,
        "decoder_start_token_id": effective.decoder_start_token_id,
    }


RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def image_processor_facts(processor) -> dict[str, Any]:
    """What a Rust port of the Hugging Face image processor needs, read from the loaded processor
    (so legacy configs such as `"size": 224` arrive normalised)."""
    size = processor.size
    height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    width = size.get("width") if isinstance(size, dict) else getattr(size, "width", None)
    if height is None or width is None:
        raise ValueError(f"image processor size {size!r} is not a fixed height/width")
    resample = int(processor.resample)
    return {
        "image_processor": type(processor).__name__,
        "image_processor_backend": processor.backend,
        "image_height": int(height),
        "image_width": int(width),
        "do_resize": bool(processor.do_resize),
        "resample": RESAMPLE_NAMES[resample],
        "resize_antialias": processor.backend == "torchvision",
        "do_rescale": bool(processor.do_rescale),
        "rescale_factor": float(processor.rescale_factor),
        "do_normalize": bool(processor.do_normalize),
        "image_mean": [float(v) for v in processor.image_mean],
        "image_std": [float(v) for v in processor.image_std],
        "do_convert_rgb": bool(processor.do_convert_rgb),
        "do_center_crop": bool(getattr(processor, "do_center_crop", False) or False),
    }


def attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
