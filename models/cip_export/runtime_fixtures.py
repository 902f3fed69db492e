"""Test-only model directory for the Rust runtime layer (tests/runtime.rs).

Writes tests/fixtures/runtime/toy-sd/: a directory in the optimum SD layout whose graphs are tiny
hand-built ONNX graphs, not a diffusion model. The Rust tests use it to exercise manifest reading,
file checks, graph I/O validation and one inference whose result they recompute from the inputs:

- unet/model.onnx: y = x @ w + b and y_argmax = argmax(y, axis=1); x is float32 [batch, 3],
  w float32 [3, 2], b float32 [2].
- text_encoder/model.onnx: hidden = float(input_ids) * scale, with `scale` an initializer that is
  also listed as a graph input (an overridable initializer: neither common.onnx_io nor ONNX
  Runtime counts it as an input, which the tests pin).
- model_index.json: a non-graph file, so the file list holds more than graphs.

Run from models/:  python -m cip_export.runtime_fixtures [--out ../tests/fixtures/runtime]
The output is byte-for-byte reproducible (no randomness, fixed producer fields).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from .common import write_manifest

OPSET = 17
IR_VERSION = 8  # ONNX Runtime 1.32 reads it; pinned so that a newer onnx package writes the same bytes
PRODUCER = "cip-runtime-fixtures"


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version="1",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def affine_graph() -> onnx.ModelProto:
    """y = x @ w + b, y_argmax = argmax(y, axis=1)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
        helper.make_node("ArgMax", ["y"], ["y_argmax"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "affine",
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [2]),
        ],
        outputs=[
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("y_argmax", TensorProto.INT64, ["batch"]),
        ],
    )
    return _model(graph)


def scale_graph() -> onnx.ModelProto:
    """hidden = float(input_ids) * scale, scale = 0.5 (an initializer also listed as an input)."""
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.5])
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids_float", "scale"], ["hidden"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scale",
        inputs=[
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
        ],
        outputs=[helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence"])],
        initializer=[scale],
    )
    return _model(graph)


def write_toy_sd(out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    (out / "unet").mkdir(parents=True)
    (out / "text_encoder").mkdir(parents=True)
    onnx.save(affine_graph(), str(out / "unet" / "model.onnx"))
    onnx.save(scale_graph(), str(out / "text_encoder" / "model.onnx"))
    index = {"_class_name": "CipRuntimeFixture", "note": "graphs are toy graphs, not a diffusion model"}
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return write_manifest(
        out,
        family="sd",
        dtype="float32",
        source="cip-test: hand-built ONNX graphs (models/cip_export/runtime_fixtures.py)",
        graphs={"unet": "unet/model.onnx", "text_encoder": "text_encoder/model.onnx"},
        config={"sample_size": 8, "scheduler": {"name": "pndm", "beta_start": 0.00085}},
    )


def make_fixture(root: Path) -> None:
    """Writes ROOT/runtime/ (ROOT is tests/fixtures), like the family modules' make_fixture."""
    write_toy_sd(Path(root) / "runtime" / "toy-sd")


def main() -> None:
    default_out = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "runtime"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out, help="directory to write toy-sd/ into")
    args = parser.parse_args()
    manifest = write_toy_sd(args.out / "toy-sd")
    print(f"wrote {manifest.parent}")


if __name__ == "__main__":
    main()
