"""Shared pieces of every exporter: the `cip-model.toml` manifest, digests, ONNX I/O introspection.

The manifest is the contract with the Rust side (`src/runtime/model_dir.rs`); models/README.md
documents it. Keep the two in step: a field written here is a field read there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import blake3
import tomli_w

from . import EXPORTER_VERSION

MANIFEST = "cip-model.toml"
MANIFEST_FORMAT = 1

# ONNX TensorProto element types -> the names the manifest uses.
_ONNX_DTYPES = {
    1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64",
    9: "bool", 10: "float16", 11: "float64", 16: "bfloat16",
}


def setup_offline() -> None:
    """Never let a hub lookup hang: each miss retries for ~20 s otherwise (pitfalls.md).

    Called by the CLI unless the user passes --online (the real-export path on a networked machine).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def file_blake3(path: Path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def directory_digest(files: list[dict[str, Any]]) -> str:
    """blake3 over "<relpath>\\t<size>\\t<blake3>\\n" lines sorted by path.

    Rust recomputes exactly this in `cip models check --deep`.
    """
    h = blake3.blake3()
    for f in sorted(files, key=lambda f: f["path"]):
        h.update(f"{f['path']}\t{f['size']}\t{f['blake3']}\n".encode())
    return h.hexdigest()


def onnx_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Input/output names, element types and shapes (ints or symbolic names) of an ONNX graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims: list[int | str] = []
            for i, d in enumerate(t.shape.dim):
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                elif d.dim_param:
                    dims.append(d.dim_param)
                else:
                    dims.append(f"dim{i}")
            out.append({"name": v.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": dims})
        return out

    initializer_names = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializer_names]
    return {"inputs": describe(inputs), "outputs": describe(model.graph.output)}


def write_manifest(
    out_dir: Path,
    family: str,
    dtype: str,
    source: str,
    graphs: dict[str, str],
    config: dict[str, Any],
) -> Path:
    """Write `cip-model.toml` for a finished export directory.

    graphs maps a role name (e.g. "unet") to the ONNX path relative to out_dir. Every other file in
    the directory is listed with its size and blake3, so cache keys can use the recorded digest
    instead of rehashing gigabytes on every run.
    """
    out_dir = Path(out_dir)
    files = []
    for p in sorted(out_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(out_dir).as_posix()
            files.append({"path": rel, "size": p.stat().st_size, "blake3": file_blake3(p)})
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "family": family,
        "dtype": dtype,
        "source": source,
        "exporter": EXPORTER_VERSION,
        "digest": {"blake3": directory_digest(files), "files": len(files)},
        "graphs": {},
        "config": config,
        "files": files,
    }
    for role, rel in sorted(graphs.items()):
        io = onnx_io(out_dir / rel)
        manifest["graphs"][role] = {"path": rel, **io}
    path = out_dir / MANIFEST
    with open(path, "wb") as f:
        tomli_w.dump(_drop_none(manifest), f)
    return path


def _drop_none(value: Any) -> Any:
    """TOML has no null: drop None values (the Rust side treats a missing key as absent)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value
