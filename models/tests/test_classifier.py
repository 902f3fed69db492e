"""Parity of the classifier export (tests/fixtures/resnet-tiny) with eager torch / torchvision.

The train-step graph must reproduce torch.optim.SGD after CrossEntropyLoss with BN in train mode,
at any batch size; the forward graph must reproduce torchvision's eval-mode logits, also after its
weights are rewritten in place from a train state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

MODELS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(MODELS))

from cip_export import classifier  # noqa: E402
from cip_export.classifier import TrainStateLayout  # noqa: E402

ROOT = MODELS.parent
FIXTURE = ROOT / "tests" / "fixtures" / "resnet-tiny"
REFERENCE = ROOT / "tests" / "fixtures" / "reference" / "classifier"

# Relative error bounds, per tensor: max |actual - expected| / max |expected|.
# Logits, loss and BN running stats: 1e-5.
TOLERANCE = 1e-5
# New params and momentum buffers carry raw gradients (a bias or BN shift starts at zero, so its new
# value is -lr * gradient). fp32 gradients of this net are only good to ~1e-5: torch's own fp32 step
# differs from a float64 torch step by up to 9e-6, and ORT's by as much (measured over 24 seeded
# batches of 8 and 12: ORT vs torch fp32 up to 1.1e-5, ORT vs fp64 up to 1.3e-5). Two fp32
# computations of the same step can therefore differ by twice that noise floor.
GRADIENT_TOLERANCE = 2e-5
# Ten chained steps (the bound): per-step noise compounds through the momentum buffers.
TEN_STEP_TOLERANCE = 1e-4


def rel_error(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.abs(expected).max()), 1e-30)
    return float(np.abs(actual - expected).max()) / scale


def worst(actual: dict, expected: dict, names) -> tuple[float, str]:
    return max((rel_error(actual[n], expected[n]), n) for n in names)


def assert_step_matches(actual: dict, expected: dict, layout: TrainStateLayout, what: str = "") -> None:
    """Every train-step output within its bound (see TOLERANCE / GRADIENT_TOLERANCE)."""
    trained = [f"new.{n}" for n in layout.param_inputs + layout.momentum_inputs]
    err, name = worst(actual, expected, trained)
    assert err < GRADIENT_TOLERANCE, f"{what} {name}: relative error {err:.2e}"
    err, name = worst(actual, expected, [f"new.{n}" for n in layout.state_inputs] + ["loss"])
    assert err < TOLERANCE, f"{what} {name}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def manifest() -> dict:
    with open(FIXTURE / "cip-model.toml", "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def layout() -> TrainStateLayout:
    return TrainStateLayout.of(fresh_model())


@pytest.fixture(scope="module")
def initial_state() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / classifier.STATE_FILE))


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=sorted(classifier.TRAIN_STEP_GRAPHS))
def train_step(request) -> ort.InferenceSession:
    """Both train-step graphs (convolution and GEMM form): every step test runs on each."""
    return session(FIXTURE / classifier.TRAIN_STEP_GRAPHS[request.param])


@pytest.fixture(scope="module")
def forward() -> ort.InferenceSession:
    return session(FIXTURE / classifier.FORWARD_GRAPH)


def fresh_model() -> torch.nn.Module:
    return classifier.build_model("resnet-tiny", classifier.FIXTURE_CLASSES, classifier.FIXTURE_SEED)


def model_with(layout, state, prefix="") -> torch.nn.Module:
    model = fresh_model()
    classifier.load_train_state(model, layout, state, prefix)
    return model


def run_step(sess, layout, state, images, labels, *, lr, momentum, weight_decay, nesterov, label_smoothing, prefix=""):
    """One train_step.onnx call; `state` holds `<prefix>param.*` etc. Returns the outputs by name."""
    feeds = {n: np.ascontiguousarray(np.asarray(state[prefix + n])) for n in layout.tensor_inputs}
    feeds["images"] = images.numpy()
    feeds["labels"] = labels.numpy()
    for name, value in zip(classifier.SCALAR_INPUTS, (lr, momentum, weight_decay, float(nesterov), label_smoothing)):
        feeds[name] = np.array(value, dtype=np.float32)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def as_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in tensors.items()}


HYPER = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
VARIANTS = [(False, 0.0), (False, 0.1), (True, 0.0), (True, 0.1)]


# ---------------------------------------------------------------------------------------------
# Manifest and files


def test_manifest_describes_the_train_state(manifest, layout, initial_state):
    config = manifest["config"]
    assert manifest["family"] == "classifier"
    assert config["params"] == layout.param_inputs
    assert config["momentum_buffers"] == layout.momentum_inputs
    assert config["states"] == layout.state_inputs
    assert config["scalars"] == list(classifier.SCALAR_INPUTS)
    assert sorted(initial_state) == sorted(layout.tensor_inputs)
    for name in layout.momentum_inputs:
        assert not initial_state[name].any(), f"{name} must start at zero"

    for role in classifier.TRAIN_STEP_GRAPHS:
        check_train_step_io(manifest["graphs"][role], layout, initial_state)

    fwd = manifest["graphs"]["forward"]
    assert [v["name"] for v in fwd["inputs"]] == ["images"]
    assert fwd["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert fwd["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", 10]}


def check_train_step_io(step, layout, initial_state):
    assert [v["name"] for v in step["inputs"]] == layout.step_inputs
    assert [v["name"] for v in step["outputs"]] == layout.step_outputs
    by_name = {v["name"]: v for v in step["inputs"]}
    for name in layout.tensor_inputs:
        assert by_name[name]["shape"] == list(initial_state[name].shape), name
    assert by_name["images"]["shape"] == ["batch", 3, 32, 32]
    assert by_name["labels"]["shape"] == ["batch"] and by_name["labels"]["dtype"] == "int64"
    for name in classifier.SCALAR_INPUTS:
        assert by_name[name]["shape"] == [] and by_name[name]["dtype"] == "float32"


def test_forward_weights_sit_at_recorded_offsets(manifest, layout, initial_state):
    config = manifest["config"]
    records = config["initializers"]
    assert [r["name"] for r in records] == layout.weight_inputs
    data = (FIXTURE / config["weights_file"]).read_bytes()
    proto = onnx.load(str(FIXTURE / classifier.FORWARD_GRAPH), load_external_data=False)
    external = {
        init.name: {e.key: e.value for e in init.external_data}
        for init in proto.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
    }
    assert sorted(external) == sorted(layout.weight_inputs)
    end = 0
    for r in records:
        assert r["offset"] % config["weights_alignment"] == 0
        assert r["offset"] >= end, "initializers overlap"
        end = r["offset"] + r["length"]
        assert external[r["name"]] == {
            "location": config["weights_file"],
            "offset": str(r["offset"]),
            "length": str(r["length"]),
        }
        tensor = initial_state[r["source"]]
        assert r["shape"] == list(tensor.shape) and r["dtype"] == "float32"
        assert data[r["offset"] : end] == tensor.numpy().astype("<f4").tobytes(), r["name"]
    assert end <= len(data)


# ---------------------------------------------------------------------------------------------
# Forward graph


def test_forward_matches_torchvision(forward, layout, initial_state):
    ref = load_file(str(REFERENCE / "forward.safetensors"))
    (logits,) = forward.run(["logits"], {"images": ref["images"].numpy()})
    assert rel_error(logits, ref["logits"]) < TOLERANCE
    # The committed logits are what torchvision computes for the committed state.
    with torch.no_grad():
        eager = model_with(layout, initial_state).eval()(ref["images"])
    assert rel_error(eager, ref["logits"]) < 1e-6


@pytest.mark.parametrize("batch", [1, 6])
def test_forward_batch_is_dynamic(forward, layout, initial_state, batch):
    images, _ = classifier.reference_batch(7, batch, 32, 10)
    (logits,) = forward.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        eager = model_with(layout, initial_state).eval()(images)
    assert logits.shape == (batch, 10)
    assert rel_error(logits, eager) < TOLERANCE


# ---------------------------------------------------------------------------------------------
# Train-step graph


@pytest.mark.parametrize("nesterov,label_smoothing", VARIANTS)
@pytest.mark.parametrize("batch", [8, 12])
def test_train_step_matches_torch_sgd(train_step, layout, initial_state, batch, nesterov, label_smoothing):
    """One step at two batch sizes through the same graph equals torch.optim.SGD's step."""
    images, labels = classifier.reference_batch(1000 + batch, batch, 32, 10)
    got = run_step(train_step, layout, initial_state, images, labels, nesterov=nesterov, label_smoothing=label_smoothing, **HYPER)
    model = model_with(layout, initial_state)
    (expected,) = classifier.torch_sgd_steps(
        model, layout, [(images, labels)], nesterov=nesterov, label_smoothing=label_smoothing, **HYPER
    )
    assert_step_matches(got, as_numpy(expected), layout)


def test_zero_momentum_buffer_is_torch_first_step(train_step, layout, initial_state):
    """torch sets buf = d_p at its first step; the graph computes momentum * 0 + d_p from the zero
    buffer. The two must agree: bit-for-bit with momentum 0 (buf unused), and with torch."""
    images, labels = classifier.reference_batch(31, 8, 32, 10)
    with_momentum = run_step(train_step, layout, initial_state, images, labels, nesterov=False, label_smoothing=0.0, **HYPER)
    no_momentum = run_step(
        train_step, layout, initial_state, images, labels, lr=0.1, momentum=0.0, weight_decay=5e-4, nesterov=False, label_smoothing=0.0
    )
    for name in layout.momentum_inputs:
        np.testing.assert_array_equal(with_momentum[f"new.{name}"], no_momentum[f"new.{name}"])
    model = model_with(layout, initial_state)
    (expected,) = classifier.torch_sgd_steps(model, layout, [(images, labels)], nesterov=False, label_smoothing=0.0, **HYPER)
    err, name = worst(with_momentum, as_numpy(expected), [f"new.{n}" for n in layout.momentum_inputs])
    assert err < GRADIENT_TOLERANCE, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("arch", ["resnet-tiny", "resnet18", "resnet50"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_gemm_step_function_is_torch_sgd_in_float64(arch, nesterov):
    """The GEMM train step's function (channels_first_forward, before any export) is exactly
    torch.optim.SGD in float64, for every block kind: BasicBlock (resnet-tiny, resnet18) and
    Bottleneck with 1x1 and stride-2 convolutions (resnet50), which the fixture does not cover."""
    torch.manual_seed(1)
    model = classifier.build_model(arch, 7).double()
    layout = TrainStateLayout.of(model)
    step_model = classifier._without_batch_counters(model).train()
    state = classifier.train_state_of(step_model, layout)
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    labels = torch.tensor([0, 5, 2])
    scalars = [torch.tensor(v, dtype=torch.float64) for v in (0.1, 0.9, 5e-4, float(nesterov), 0.1)]
    step = classifier.make_train_step(step_model, layout, classifier.channels_first_forward(step_model))
    got = dict(zip(layout.step_outputs, step(*(state[n] for n in layout.tensor_inputs), images, labels, *scalars)))
    (want,) = classifier.torch_sgd_steps(
        model, layout, [(images, labels)], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov, label_smoothing=0.1
    )
    for name, expected in want.items():
        err = ((got[name] - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
        assert err < 1e-9, f"{arch} {name}: relative error {err:.2e}"


def test_train_step_normalises_with_batch_statistics(train_step, layout, initial_state):
    """The BN trap: an exported "training" graph that normalises with the running stats would match
    the eval-mode step instead. Give the running stats values far from the batch's so the two
    steps differ clearly, then check that the graph is the train-mode one."""
    state = dict(initial_state)
    gen = torch.Generator().manual_seed(5)
    for name in layout.state_inputs:
        shape = state[name].shape
        state[name] = (torch.rand(shape, generator=gen) + 0.5) if name.endswith("running_var") else torch.randn(shape, generator=gen)
    images, labels = classifier.reference_batch(32, 8, 32, 10)
    got = run_step(train_step, layout, state, images, labels, nesterov=False, label_smoothing=0.0, **HYPER)
    params = [f"new.{n}" for n in layout.param_inputs]

    (train_mode,) = classifier.torch_sgd_steps(
        model_with(layout, state), layout, [(images, labels)], nesterov=False, label_smoothing=0.0, **HYPER
    )
    (eval_mode,) = classifier.torch_sgd_steps(
        model_with(layout, state), layout, [(images, labels)], nesterov=False, label_smoothing=0.0, train_mode=False, **HYPER
    )
    assert_step_matches(got, as_numpy(train_mode), layout, "train mode")
    assert worst(got, as_numpy(eval_mode), params + ["loss"])[0] > 1e-2
    # Train mode moves the running stats towards the batch's; eval mode leaves them.
    assert worst(got, {f"new.{n}": state[n].numpy() for n in layout.state_inputs}, [f"new.{n}" for n in layout.state_inputs])[0] > 1e-2


# ---------------------------------------------------------------------------------------------
# Committed references (what the Rust side checks against)


def reference_index() -> dict:
    import json

    return json.loads((REFERENCE / "index.json").read_text())


def reference_cases(kind: str) -> list[dict]:
    return [c for c in reference_index()["cases"] if c["kind"] == kind]


def test_reference_index_states_these_tolerances():
    """The Rust side reads its bounds from index.json: they must be the ones checked here."""
    tolerance = reference_index()["tolerance"]
    assert tolerance == {
        "logits": TOLERANCE,
        "loss": TOLERANCE,
        "state": TOLERANCE,
        "param": GRADIENT_TOLERANCE,
        "momentum_buf": GRADIENT_TOLERANCE,
        "ten_steps": TEN_STEP_TOLERANCE,
    }


def test_ten_step_reference_is_eager_torch(layout, initial_state):
    """The committed ten-step reference is what torch.optim.SGD computes now."""
    (case,) = reference_cases("train_steps")
    batches = [load_file(str(REFERENCE / name)) for name in case["batches"]]
    assert len(batches) == 10
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = classifier.torch_sgd_steps(
            model_with(layout, initial_state),
            layout,
            [(b["images"], b["labels"]) for b in batches],
            nesterov=False,
            label_smoothing=0.0,
            **HYPER,
        )
    finally:
        torch.set_num_threads(threads)
    expected = load_file(str(REFERENCE / case["file"]))
    final = {k: v for k, v in results[-1].items() if k != "loss"}
    err, name = worst(as_numpy(final), as_numpy(expected), [k for k in layout.step_outputs if k != "loss"])
    assert err < 1e-6, f"{name}: {err:.2e}"
    losses = torch.stack([r["loss"] for r in results])
    assert torch.allclose(losses, expected["losses"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("nesterov,label_smoothing", VARIANTS)
def test_chained_steps_match_references(train_step, layout, initial_state, nesterov, label_smoothing):
    """Step 1 from the committed state, then step 2 fed with step 1's outputs (non-zero momentum,
    another batch size), against the committed eager-torch references."""
    variant = classifier._variant_name(nesterov, label_smoothing)
    cases = {c["name"]: c for c in reference_cases("train_step")}
    first = cases[f"sgd_{variant}_step1"]
    state, prefix = as_numpy(load_file(str(REFERENCE / first["state_in"]))), first["state_in_prefix"]
    assert cases[f"sgd_{variant}_step2"]["state_in"] == first["file"]
    for step in (1, 2):
        case = cases[f"sgd_{variant}_step{step}"]
        batch = load_file(str(REFERENCE / case["batch"]))
        # Step 2 runs on step 1's graph outputs, as cip chains them.
        got = run_step(train_step, layout, state, batch["images"], batch["labels"], prefix=prefix, **case["scalars"])
        expected = load_file(str(REFERENCE / case["file"]))
        assert_step_matches(got, as_numpy(expected), layout, f"step {step}")
        state, prefix = got, "new."


def test_references_are_eager_torch(layout, initial_state):
    """The committed step references are what torch.optim.SGD computes now."""
    cases = {c["name"]: c for c in reference_cases("train_step")}
    batches = [load_file(str(REFERENCE / f"batch{i}.safetensors")) for i in (1, 2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for nesterov, label_smoothing in VARIANTS:
            variant = classifier._variant_name(nesterov, label_smoothing)
            results = classifier.torch_sgd_steps(
                model_with(layout, initial_state),
                layout,
                [(b["images"], b["labels"]) for b in batches],
                nesterov=nesterov,
                label_smoothing=label_smoothing,
                **HYPER,
            )
            for step, result in enumerate(results, start=1):
                assert cases[f"sgd_{variant}_step{step}"]["scalars"] == {**HYPER, "nesterov": float(nesterov), "label_smoothing": label_smoothing}
                expected = load_file(str(REFERENCE / f"sgd_{variant}_step{step}.safetensors"))
                assert sorted(expected) == sorted(layout.step_outputs)
                err, name = worst(as_numpy(result), as_numpy(expected), layout.step_outputs)
                assert err < 1e-6, f"{variant} step {step} {name}: {err:.2e}"
    finally:
        torch.set_num_threads(threads)


def test_trained_weights_rewritten_into_data_file(train_step, manifest, layout, initial_state, tmp_path):
    """Train two steps through the graph, write the new params and stats into a copy of
    model.onnx.data at the recorded offsets (model.onnx copied unchanged): the forward graph then
    gives torchvision's logits for those weights."""
    cases = {c["name"]: c for c in reference_cases("train_step")}
    state, prefix = as_numpy(initial_state), ""
    for step in (1, 2):
        case = cases[f"sgd_nesterov0_ls0_step{step}"]
        batch = load_file(str(REFERENCE / case["batch"]))
        state = run_step(train_step, layout, state, batch["images"], batch["labels"], prefix=prefix, **case["scalars"])
        prefix = "new."

    config = manifest["config"]
    shutil.copy(FIXTURE / classifier.FORWARD_GRAPH, tmp_path / classifier.FORWARD_GRAPH)
    data = bytearray((FIXTURE / config["weights_file"]).read_bytes())
    for r in config["initializers"]:
        raw = np.ascontiguousarray(state["new." + r["source"]], dtype="<f4").tobytes()
        assert len(raw) == r["length"]
        data[r["offset"] : r["offset"] + r["length"]] = raw
    (tmp_path / config["weights_file"]).write_bytes(bytes(data))

    ref = load_file(str(REFERENCE / "forward_trained.safetensors"))
    (logits,) = session(tmp_path / classifier.FORWARD_GRAPH).run(["logits"], {"images": ref["images"].numpy()})
    trained = model_with(layout, {k: torch.from_numpy(v) for k, v in state.items()}, prefix="new.").eval()
    with torch.no_grad():
        eager = trained(ref["images"])
    assert rel_error(logits, eager) < TOLERANCE
    assert rel_error(logits, ref["logits"]) < 1e-4  # weights from ORT's steps vs torch's steps


# ---------------------------------------------------------------------------------------------
# The exporter itself


def test_cli_arguments_and_weights_file(layout, tmp_path):
    """`classifier --weights FILE` exports those weights, under their train-state names."""
    import argparse

    parser = argparse.ArgumentParser()
    classifier.add_arguments(parser)
    trained = load_file(str(REFERENCE / "sgd_nesterov1_ls0.1_step1.safetensors"))
    model = model_with(layout, trained, prefix="new.")
    weights = tmp_path / "weights.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, str(weights))
    args = parser.parse_args(
        ["--arch", "resnet-tiny", "--num-classes", "10", "--out", str(tmp_path / "out"), "--weights", str(weights), "--image-size", "32"]
    )
    assert args.mean == list(classifier.CLIP_MEAN) and args.std == list(classifier.CLIP_STD)
    loaded = classifier.build_model(args.arch, args.num_classes, args.seed)
    classifier.load_weights(loaded, args.weights)
    out = Path(args.out)
    out.mkdir()
    records, _ = classifier.export_forward(loaded, layout, args.image_size, out)
    images, _ = classifier.reference_batch(9, 3, 32, 10)
    (logits,) = session(out / classifier.FORWARD_GRAPH).run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        eager = model.eval()(images)
    assert rel_error(logits, eager) < TOLERANCE
    data = (out / classifier.FORWARD_DATA).read_bytes()
    for r in records:
        assert data[r["offset"] : r["offset"] + r["length"]] == trained["new." + r["source"]].numpy().tobytes()

    with pytest.raises(ValueError, match=r"fc.bias has shape \(10,\), the model expects \(7,\)"):
        classifier.load_weights(classifier.build_model("resnet-tiny", 7), weights)
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("fc.")}, str(partial))
    with pytest.raises(ValueError, match=r"does not fit the model: missing \['fc.weight', 'fc.bias'\]"):
        classifier.load_weights(classifier.build_model("resnet-tiny", 10), partial)


@pytest.mark.skipif(
    os.environ.get("CIP_SLOW_TESTS") != "1",
    reason="re-exports the fixture (1-4 min on 2 cores); set CIP_SLOW_TESTS=1 to run",
)
def test_fixture_regenerates_byte_for_byte(tmp_path):
    """Rerunning the generator reproduces every committed file (export, state and references),
    whatever the hash seed of the process."""
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from cip_export import classifier; classifier.make_fixture(Path(sys.argv[2]))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "7"}
    subprocess.run([sys.executable, "-c", script, str(MODELS), str(tmp_path)], check=True, env=env, capture_output=True)
    for committed_dir, new_dir in ((FIXTURE, tmp_path / "resnet-tiny"), (REFERENCE, tmp_path / "reference" / "classifier")):
        committed = sorted(p.relative_to(committed_dir).as_posix() for p in committed_dir.rglob("*") if p.is_file())
        regenerated = sorted(p.relative_to(new_dir).as_posix() for p in new_dir.rglob("*") if p.is_file())
        assert committed == regenerated
        for rel in committed:
            assert (committed_dir / rel).read_bytes() == (new_dir / rel).read_bytes(), f"{committed_dir.name}/{rel} differs"
