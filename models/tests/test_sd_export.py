"""The SD exporter: graphs match torch, the ONNX-only pipeline reproduces diffusers' images, the CLI
works on a save_pretrained directory, and the committed directory keeps its contract."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXPORT_PY

from cip_export import common, sd

REQUIRED_FILES = [
    "model_index.json",
    "text_encoder/model.onnx",
    "unet/model.onnx",
    "vae_decoder/model.onnx",
    "tokenizer/tokenizer.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
    "cip-model.toml",
]


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions(sd_fixture_dir):
    return {role: _session(sd_fixture_dir / role / "model.onnx") for role in sd.GRAPH_IO}


@pytest.fixture(scope="module")
def reference_index(sd_reference_dir):
    return json.loads((sd_reference_dir / "index.json").read_text())


def _manifest(model_dir: Path) -> dict:
    with open(model_dir / "cip-model.toml", "rb") as f:
        return tomllib.load(f)


# ---------------------------------------------------------------------------------------------
# The directory contract
# ---------------------------------------------------------------------------------------------


def test_layout_and_manifest(sd_fixture_dir, tiny_sd_pipeline):
    for rel in REQUIRED_FILES:
        assert (sd_fixture_dir / rel).is_file(), rel
    manifest = _manifest(sd_fixture_dir)
    assert manifest["family"] == "sd" and manifest["dtype"] == "fp32"
    for role, (inputs, outputs) in sd.GRAPH_IO.items():
        graph = manifest["graphs"][role]
        assert graph["path"] == f"{role}/model.onnx"
        assert [i["name"] for i in graph["inputs"]] == inputs
        assert [o["name"] for o in graph["outputs"]] == outputs
    dtypes = {(r, v["name"]): v["dtype"] for r, g in manifest["graphs"].items() for v in g["inputs"] + g["outputs"]}
    assert dtypes[("text_encoder", "input_ids")] == "int32"
    assert dtypes[("unet", "timestep")] == "float32"
    shapes = {(r, v["name"]): v["shape"] for r, g in manifest["graphs"].items() for v in g["inputs"] + g["outputs"]}
    assert shapes[("unet", "sample")] == ["batch", 4, "height", "width"]
    assert shapes[("unet", "out_sample")] == ["batch", 4, "height", "width"]
    assert shapes[("unet", "timestep")] == ["batch"]
    assert shapes[("text_encoder", "input_ids")] == ["batch", "sequence"]
    assert shapes[("vae_decoder", "latent_sample")] == ["batch", 4, "height", "width"]
    # [config] is computed from the pipeline the fixture came from.
    assert manifest["config"] == sd.manifest_config(tiny_sd_pipeline)
    assert manifest["config"]["vae_scale_factor"] == 2 and manifest["config"]["text_max_length"] == 77
    # Digest and file list describe the directory as it is.
    files = manifest["files"]
    on_disk = sorted(p.relative_to(sd_fixture_dir).as_posix() for p in sd_fixture_dir.rglob("*") if p.is_file())
    assert sorted(f["path"] for f in files) == [p for p in on_disk if p != "cip-model.toml"]
    for f in files:
        assert common.file_blake3(sd_fixture_dir / f["path"]) == f["blake3"], f["path"]
    assert manifest["digest"] == {"blake3": common.directory_digest(files), "files": len(files)}


def test_scheduler_config_keeps_only_the_sources_keys(sd_fixture_dir, tiny_sd_source):
    written = json.loads((sd_fixture_dir / "scheduler" / "scheduler_config.json").read_text())
    source = json.loads((tiny_sd_source / "scheduler" / "scheduler_config.json").read_text())
    assert written == {k: v for k, v in source.items() if k != "_diffusers_version"}
    # So a scheduler built from it gets its own class defaults, as from the hub's SD-1.5 file.
    from diffusers import EulerDiscreteScheduler

    assert EulerDiscreteScheduler.from_config(written).config.timestep_spacing == "linspace"


def test_tokenizer_files_agree(sd_fixture_dir, reference_index, tmp_path):
    """tokenizer.json (what Rust's `tokenizers` reads) and vocab.json + merges.txt give the same ids
    as the tokenizer diffusers used, truncation included."""
    import shutil

    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    tok_dir = sd_fixture_dir / "tokenizer"
    manifest = _manifest(sd_fixture_dir)["config"]
    # Neutral, like the hub's files: padding and truncation come from the manifest, not from state
    # a transformers call left on the backend.
    saved = json.loads((tok_dir / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None
    fast = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    fast.enable_truncation(manifest["text_max_length"])
    fast.enable_padding(length=manifest["text_max_length"], pad_id=manifest["pad_token_id"])
    classic_dir = tmp_path / "classic"
    shutil.copytree(tok_dir, classic_dir)
    (classic_dir / "tokenizer.json").unlink()
    classic = CLIPTokenizer.from_pretrained(str(classic_dir))
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    assert len(classic) == len(vocab) == fast.get_vocab_size()
    assert classic.bos_token_id == manifest["bos_token_id"] and classic.eos_token_id == manifest["eos_token_id"]
    for case in reference_index["cases"]:
        ids = fast.encode(case["prompt"]).ids
        assert ids == case["prompt_ids"], case["id"]
        assert classic(case["prompt"], padding="max_length", max_length=77, truncation=True).input_ids == ids
        if case["negative_prompt_ids"] is not None:
            assert fast.encode(case["negative_prompt"] or "").ids == case["negative_prompt_ids"]
    truncated = [c for c in reference_index["cases"] if c["prompt_truncated"]]
    assert truncated and all(c["prompt_ids"][-1] == manifest["eos_token_id"] for c in truncated)


# ---------------------------------------------------------------------------------------------
# (a) graphs vs torch modules
# ---------------------------------------------------------------------------------------------


def test_text_encoder_matches_torch(sessions, tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    prompts = ["a photo of tench", "blurry, low quality", "a painting of a cat"]
    for batch, length in [(1, 77), (3, 77), (2, 12)]:
        ids = pipe.tokenizer(prompts[:batch], padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            want = pipe.text_encoder(ids)
        got = sessions["text_encoder"].run(None, {"input_ids": ids.numpy().astype(np.int32)})
        np.testing.assert_allclose(got[0], want.last_hidden_state.numpy(), atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(got[1], want.pooler_output.numpy(), atol=1e-5, rtol=1e-4)


def test_unet_matches_torch(sessions, tiny_sd_pipeline):
    unet = tiny_sd_pipeline.unet
    generator = torch.Generator().manual_seed(7)
    # Batch, height and width other than the export's dummy shapes; fractional timesteps (Euler).
    for batch, h, w, seq in [(1, 8, 8, 77), (2, 8, 12, 77), (3, 16, 8, 20)]:
        sample = torch.randn(batch, 4, h, w, generator=generator)
        timestep = torch.tensor([999.0, 500.25, 13.75][:batch])
        hidden = torch.randn(batch, seq, 32, generator=generator)
        with torch.no_grad():
            want = unet(sample, timestep, hidden).sample.numpy()
        got = sessions["unet"].run(
            None, {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": hidden.numpy()}
        )[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_vae_decoder_matches_torch(sessions, tiny_sd_pipeline):
    vae = tiny_sd_pipeline.vae
    generator = torch.Generator().manual_seed(8)
    for batch, h, w in [(1, 8, 8), (2, 8, 12)]:
        latents = torch.randn(batch, 4, h, w, generator=generator)
        with torch.no_grad():
            want = vae.decode(latents).sample.numpy()
        got = sessions["vae_decoder"].run(None, {"latent_sample": latents.numpy()})[0]
        assert got.shape == (batch, 3, 2 * h, 2 * w)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_fp16_external_data_export(tiny_sd_pipeline, tmp_path):
    """The fp16 path and the >2 GB path (forced here): weights in model.onnx_data, timestep still
    float32, and the graph still computes the UNet."""
    _, unet_wrapper, _ = sd._wrappers()
    module = unet_wrapper(tiny_sd_pipeline.unet).to(torch.float16).eval()
    path = tmp_path / "unet" / "model.onnx"
    names = sd.GRAPH_IO["unet"]
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"}, "out_sample": {0: "batch", 2: "height", 3: "width"}}
    args = (torch.randn(2, 4, 8, 10, dtype=torch.float16), torch.tensor([981.0, 961.5]),
            torch.randn(2, 77, 32, dtype=torch.float16))
    try:
        used = sd.export_graph(module, args, *names, axes, path, opset=sd.DEFAULT_OPSET, external_data="always")
    finally:
        module.to(torch.float32)
    assert used == "dynamo"
    assert (path.parent / sd.EXTERNAL_DATA_NAME).stat().st_size > path.stat().st_size
    io = common.onnx_io(path)
    assert {v["name"]: v["dtype"] for v in io["inputs"] + io["outputs"]} == {
        "sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16", "out_sample": "float16"}
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(10))
    timestep = torch.tensor([640.5])
    with torch.no_grad():
        want = tiny_sd_pipeline.unet(sample, timestep, hidden).sample.numpy()
    got = _session(path).run(None, {"sample": sample.half().numpy(), "timestep": timestep.numpy(),
                                    "encoder_hidden_states": hidden.half().numpy()})[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-2, rtol=2e-2)


def test_torchscript_fallback_exports_a_working_graph(tiny_sd_pipeline, tmp_path):
    """The fallback exporter is kept working, not just present."""
    text_encoder, _, _ = sd._wrappers()
    module = text_encoder(tiny_sd_pipeline.text_encoder).eval()
    path = tmp_path / "text_encoder" / "model.onnx"
    ids = torch.full((2, 77), tiny_sd_pipeline.tokenizer.pad_token_id, dtype=torch.int32)
    ids[:, 0] = tiny_sd_pipeline.tokenizer.bos_token_id
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"},
            "pooler_output": {0: "batch"}}
    used = sd.export_graph(module, (ids,), *sd.GRAPH_IO["text_encoder"], axes, path, opset=sd.DEFAULT_OPSET,
                           exporter="torchscript")
    assert used == "torchscript"
    short = tiny_sd_pipeline.tokenizer(["a photo of tench"], return_tensors="pt").input_ids
    with torch.no_grad():
        want = tiny_sd_pipeline.text_encoder(short).last_hidden_state.numpy()
    got = _session(path).run(None, {"input_ids": short.numpy().astype(np.int32)})[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# (b) ONNX-only pipeline == diffusers' committed images
# ---------------------------------------------------------------------------------------------


def _onnx_generate(sessions, model_dir: Path, case: dict) -> np.ndarray:
    """SD sampling from the exported directory alone: tokenizer.json, the three graphs, the
    manifest's config, and a diffusers scheduler object for the step arithmetic."""
    import diffusers
    from tokenizers import Tokenizer

    config = _manifest(model_dir)["config"]
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer" / "tokenizer.json"))
    tokenizer.enable_truncation(config["text_max_length"])
    tokenizer.enable_padding(length=config["text_max_length"], pad_id=config["pad_token_id"])

    def encode(text: str) -> np.ndarray:
        ids = np.array([tokenizer.encode(text).ids], dtype=np.int32)
        return sessions["text_encoder"].run(["last_hidden_state"], {"input_ids": ids})[0]

    cfg = case["guidance"] > 1.0
    hidden = encode(case["prompt"])
    if cfg:
        hidden = np.concatenate([encode(case["negative_prompt"] or ""), hidden])

    scheduler_config = sd.parse_config_floats(case["scheduler_config"])
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    scheduler.set_timesteps(case["steps"])
    generator = torch.Generator("cpu").manual_seed(case["seed"])
    factor = config["vae_scale_factor"]
    shape = (1, config["latent_channels"], case["height"] // factor, case["width"] // factor)
    latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        batch = model_input.shape[0]
        noise = sessions["unet"].run(None, {
            "sample": model_input.numpy(),
            "timestep": np.full((batch,), float(t), dtype=np.float32),
            "encoder_hidden_states": hidden,
        })[0]
        noise = torch.from_numpy(noise)
        if cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + case["guidance"] * (text - uncond)
        latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
    decoded = sessions["vae_decoder"].run(None, {"latent_sample": (latents / config["vae_scaling_factor"]).numpy()})[0]
    image = np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)[0]
    return (image * 255).round().astype(np.uint8)


ONNX_CASES = [f"{s}-g7.5-neg-s0" for s in ["pndm", "ddim", "dpm++2m", "dpm++2m-karras", "euler", "euler-a"]] + [
    "pndm-g1.0-noneg-s0",
    "pndm-g7.5-noneg-s0-long",
    "euler-a-g7.5-neg-s3-wide",
]


@pytest.mark.parametrize("case_id", ONNX_CASES)
def test_onnx_pipeline_reproduces_diffusers(case_id, sessions, sd_fixture_dir, sd_reference_dir, reference_index):
    from PIL import Image

    case = next(c for c in reference_index["cases"] if c["id"] == case_id)
    got = _onnx_generate(sessions, sd_fixture_dir, case)
    want = np.asarray(Image.open(sd_reference_dir / case["file"]).convert("RGB"))
    assert got.shape == want.shape == (case["height"], case["width"], 3)
    diff = np.abs(got.astype(int) - want.astype(int)).max()
    assert diff <= 2, f"{case_id}: max abs pixel difference {diff}"


def test_reference_cases_cover_the_grid(reference_index):
    cases = reference_index["cases"]
    grid = {(c["scheduler"], c["guidance"], c["negative_prompt"] is not None) for c in cases if c["seed"] == 0}
    assert grid >= {(s, g, n) for s in sd.SCHEDULERS for g in (1.0, 7.5) for n in (False, True)}
    assert len({c["seed"] for c in cases if c["scheduler"] == "pndm"}) >= 3
    assert any(c["prompt_truncated"] for c in cases)
    assert len({c["file"] for c in cases}) == len(cases)


def test_intermediates_are_consistent(sessions, sd_reference_dir, reference_index):
    """The debug tensors agree with each other and with the exported graphs."""
    from safetensors.numpy import load_file

    tensors = load_file(str(sd_reference_dir / reference_index["intermediates"]["file"]))
    case = next(c for c in reference_index["cases"] if c["id"] == reference_index["intermediates"]["case"])
    assert tensors["prompt_ids"][0].tolist() == case["prompt_ids"]
    assert tensors["negative_prompt_ids"][0].tolist() == case["negative_prompt_ids"]
    shape = tensors["noise"].shape
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(case["seed"])).numpy()
    np.testing.assert_array_equal(tensors["noise"], noise)
    embeds = sessions["text_encoder"].run(["last_hidden_state"], {"input_ids": tensors["prompt_ids"]})[0]
    np.testing.assert_allclose(embeds, tensors["prompt_embeds"], atol=1e-5)
    steps = len(tensors["timesteps"])
    out = sessions["unet"].run(None, {
        "sample": tensors["unet_sample_step_0"],
        "timestep": np.full((2,), tensors["unet_timestep_step_0"], dtype=np.float32),
        "encoder_hidden_states": np.concatenate([tensors["negative_prompt_embeds"], tensors["prompt_embeds"]]),
    })[0]
    np.testing.assert_allclose(out, tensors["unet_out_step_0"], atol=1e-4)
    np.testing.assert_array_equal(tensors["final_latents"], tensors[f"latents_step_{steps - 1}"])


# ---------------------------------------------------------------------------------------------
# (c) the new user's path: export.py sd --source <save_pretrained directory>
# ---------------------------------------------------------------------------------------------


def test_cli_exports_a_local_pipeline(tiny_sd_source, sd_fixture_dir, tmp_path):
    out = tmp_path / "sd-export"
    result = subprocess.run(
        [sys.executable, str(EXPORT_PY), "sd", "--source", str(tiny_sd_source), "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exported with the dynamo exporter" in result.stdout
    for rel in REQUIRED_FILES:
        assert (out / rel).is_file(), rel
    # Same pipeline as the committed fixture, so every file but the manifest's source is identical.
    produced = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(sd_fixture_dir).as_posix() for p in sd_fixture_dir.rglob("*") if p.is_file())
    assert produced == committed
    for rel in produced:
        if rel != "cip-model.toml":
            assert (out / rel).read_bytes() == (sd_fixture_dir / rel).read_bytes(), rel
    manifest, fixture_manifest = _manifest(out), _manifest(sd_fixture_dir)
    assert manifest["source"] == str(tiny_sd_source)
    manifest.pop("source"), fixture_manifest.pop("source")
    assert manifest == fixture_manifest


def test_cli_reports_a_missing_source_without_hanging(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXPORT_PY), "sd", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "nope" in result.stderr
