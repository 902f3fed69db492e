"""Reference outputs for cip's Stable Diffusion noise and schedulers.

- `reference/noise/`: `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` for
  several seeds and shapes (small tensors take torch's scalar path, 16 values and more the
  vectorised one), and sequences of consecutive draws from one generator.
- `reference/schedulers/`: diffusers schedulers built with `XScheduler.from_config(<SD-1.5
  scheduler_config.json>, **overrides)`. For each case: the timesteps, sigmas, init_noise_sigma and
  a full trajectory (the initial sample; per step the scaled model input, the model output fed in,
  and the resulting sample). Plus timesteps and sigmas alone for many step counts and spacings.

The model output is seeded Gaussian noise standing in for a UNet. The initial latents come from a
seeded `torch.Generator`, and that same generator is passed to `step`, as diffusers' pipelines do,
so the ancestral scheduler continues its stream.

Run `python models/cip_export/noise_schedulers.py` to rewrite the committed fixtures.
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
from pathlib import Path
from typing import Any

# The same tensors for the same torch, whatever the thread count.
NOISE_SEEDS = [0, 1, 2**31 + 5]
NOISE_SHAPES = [[1, 4, 8, 8], [2, 4, 64, 64], [3], [17], [5, 3], [1], [15], [16], [31], [1000]]
# u64 seeds: torch keeps the low 32 bits for mt19937, and the full value as initial_seed.
WIDE_SEEDS = [2**32 + 5, 2**63 + 11, 2**64 - 1]
WIDE_SHAPES = [[1, 4, 8, 8], [5, 3]]
SEQUENCES = [
    ("mixed_42", 42, [[3], [17], [1, 4, 8, 8], [1], [5, 3], [16], [2], [1]]),
    ("odd_small_then_big", 2**31 + 5, [[1], [1], [33], [7], [1, 4, 8, 8], [1]]),
    ("latents_then_steps", 1234, [[1, 4, 8, 8]] * 5),
]

# stable-diffusion-v1-5/stable-diffusion-v1-5, scheduler/scheduler_config.json.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# cip's scheduler names -> diffusers class and the from_config overrides the name implies.
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
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
DEFAULT_SPACING = {"pndm": "leading", "ddim": "leading"}

# Small latents keep the files small: [1, 4, 8, 8] for the SD-1.5 cases up to 10 steps,
# [1, 4, 4, 4] for 50 steps and the variants, a batch of two for per-item generators.
MAIN_SHAPE = [1, 4, 8, 8]
LONG_SHAPE = [1, 4, 4, 4]
VARIANT_SHAPE = [1, 4, 4, 4]
BATCH_SHAPE = [2, 4, 4, 4]
LATENT_SEED = 1234
MODEL_SEED = 777

# Step counts for the timesteps-only cases (61 and 103 make numpy's trailing arange one longer).
SCHEDULE_STEP_COUNTS = [1, 2, 3, 5, 7, 13, 20, 25, 33, 49, 50, 61, 77, 100, 103, 250]


def _variants() -> list[tuple[str, int, dict[str, Any], list[int], dict[str, Any]]]:
    """(kind, steps, overrides, shape, extra) for every trajectory case."""
    cases: list[tuple[str, int, dict[str, Any], list[int], dict[str, Any]]] = []
    for kind in KINDS:
        for steps in (4, 10):
            cases.append((kind, steps, {}, MAIN_SHAPE, {}))
        cases.append((kind, 50, {}, LONG_SHAPE, {}))
        cases.append((kind, 1, {}, VARIANT_SHAPE, {}))
        default = DEFAULT_SPACING.get(kind, "linspace")
        for spacing in ("linspace", "leading", "trailing"):
            if spacing != default:
                cases.append((kind, 10, {"timestep_spacing": spacing}, VARIANT_SHAPE, {}))
        cases.append((kind, 10, {"prediction_type": "v_prediction"}, VARIANT_SHAPE, {}))
    for kind in ("ddim", "dpm++2m", "euler"):
        cases.append((kind, 10, {"prediction_type": "sample"}, VARIANT_SHAPE, {}))
    cases += [
        ("pndm", 10, {"skip_prk_steps": False}, VARIANT_SHAPE, {}),
        ("pndm", 4, {"skip_prk_steps": False, "timestep_spacing": "linspace"}, VARIANT_SHAPE, {}),
        ("pndm", 10, {"set_alpha_to_one": True, "prediction_type": "v_prediction"}, VARIANT_SHAPE, {}),
        ("ddim", 10, {"set_alpha_to_one": True, "clip_sample": True}, VARIANT_SHAPE, {}),
        ("ddim", 10, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, VARIANT_SHAPE, {}),
        ("euler", 10, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, VARIANT_SHAPE, {}),
        ("ddim", 10, {"beta_schedule": "squaredcos_cap_v2"}, VARIANT_SHAPE, {}),
        ("euler", 10, {"beta_schedule": "squaredcos_cap_v2"}, VARIANT_SHAPE, {}),
        # (With Karras sigmas this schedule starts 998, 998, ...: diffusers then starts at index 1
        # and runs off the end, so that case is not recorded.)
        ("dpm++2m", 10, {"beta_schedule": "squaredcos_cap_v2"}, VARIANT_SHAPE, {}),
        ("dpm++2m", 10, {"solver_type": "heun"}, VARIANT_SHAPE, {}),
        ("dpm++2m", 10, {"final_sigmas_type": "sigma_min", "lower_order_final": False}, VARIANT_SHAPE, {}),
        ("dpm++2m", 20, {"final_sigmas_type": "sigma_min"}, VARIANT_SHAPE, {}),
        ("dpm++2m", 10, {"final_sigmas_type": "sigma_min", "euler_at_final": True}, VARIANT_SHAPE, {}),
        ("dpm++2m", 10, {"lambda_min_clipped": -2.5}, VARIANT_SHAPE, {}),
        ("dpm++2m-karras", 20, {"timestep_spacing": "trailing"}, VARIANT_SHAPE, {}),
        ("euler", 10, {"use_karras_sigmas": True}, VARIANT_SHAPE, {}),
        ("euler", 10, {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, VARIANT_SHAPE, {}),
        ("euler", 10, {"final_sigmas_type": "sigma_min"}, VARIANT_SHAPE, {}),
        ("ddim", 61, {"timestep_spacing": "trailing"}, [1, 1, 4, 4], {}),
        ("euler-a", 10, {}, BATCH_SHAPE, {"generator_seeds": [11, 12]}),
    ]
    for kind in ("ddim", "dpm++2m", "euler", "euler-a"):
        zero_snr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
        cases.append((kind, 10, zero_snr, VARIANT_SHAPE, {}))
    return cases


def _case_name(kind: str, steps: int, overrides: dict[str, Any], extra: dict[str, Any]) -> str:
    parts = [kind.replace("+", "p"), f"{steps}"]
    for key, value in overrides.items():
        parts.append(f"{key}-{value}".replace(".", "_").lower())
    if "generator_seeds" in extra:
        parts.append("per_item_generators")
    return "_".join(parts)


def _build(kind: str, overrides: dict[str, Any]):
    import diffusers

    class_name, implied = KINDS[kind]
    cls = getattr(diffusers, class_name)
    return cls.from_config(dict(SD15_SCHEDULER_CONFIG), **implied, **overrides)


def _as_float(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def _trajectory(kind: str, steps: int, overrides: dict[str, Any], shape: list[int], extra: dict[str, Any]):
    import torch

    scheduler = _build(kind, overrides)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.clone()
    sigmas = getattr(scheduler, "sigmas", None)
    sigmas = sigmas.clone() if isinstance(sigmas, torch.Tensor) else None
    init_noise_sigma = _as_float(scheduler.init_noise_sigma)

    if "generator_seeds" in extra:
        generator: Any = [torch.Generator("cpu").manual_seed(s) for s in extra["generator_seeds"]]
    else:
        generator = torch.Generator("cpu").manual_seed(LATENT_SEED)
    from diffusers.utils.torch_utils import randn_tensor

    latents = randn_tensor(tuple(shape), generator=generator, dtype=torch.float32)
    sample = latents * scheduler.init_noise_sigma
    model = torch.Generator("cpu").manual_seed(MODEL_SEED)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    # PNDM, DDIM and DPM-Solver return the sample itself; only then is model_input not stored.
    scales_input = True

    tensors = {"latents": latents, "initial_sample": sample.clone(), "timesteps": timesteps}
    if sigmas is not None:
        tensors["sigmas"] = sigmas
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(sample, t)
        model_output = torch.randn(tuple(shape), generator=model, dtype=torch.float32)
        kwargs = {"generator": generator} if takes_generator else {}
        if model_input is not sample:
            tensors[f"step{i:03d}/model_input"] = model_input.clone()
        else:
            scales_input = False
        sample = scheduler.step(model_output, t, sample, **kwargs).prev_sample
        tensors[f"step{i:03d}/model_output"] = model_output
        tensors[f"step{i:03d}/prev_sample"] = sample.clone()
    meta = {
        "timesteps_dtype": str(timesteps.dtype).removeprefix("torch."),
        "init_noise_sigma": init_noise_sigma,
        "order": scheduler.order,
        "scales_model_input": scales_input,
        "model_calls": len(timesteps),
        "max_abs_sample": float(max(t.abs().max() for k, t in tensors.items() if "sample" in k)),
    }
    return tensors, meta


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def make_noise(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    cases = []
    for seeds, shapes in ((NOISE_SEEDS, NOISE_SHAPES), (WIDE_SEEDS, WIDE_SHAPES)):
        for seed in seeds:
            for shape in shapes:
                generator = torch.Generator("cpu").manual_seed(seed)
                assert generator.initial_seed() == seed
                key = f"case/{seed}/{'x'.join(map(str, shape))}"
                tensors[key] = torch.randn(shape, generator=generator, dtype=torch.float32)
                cases.append({"seed": seed, "shape": shape, "key": key})
    sequences = []
    for name, seed, shapes in SEQUENCES:
        generator = torch.Generator("cpu").manual_seed(seed)
        draws = []
        for i, shape in enumerate(shapes):
            key = f"sequence/{name}/{i}"
            tensors[key] = torch.randn(shape, generator=generator, dtype=torch.float32)
            draws.append({"shape": shape, "key": key})
        sequences.append({"name": name, "seed": seed, "draws": draws})
    save_file(tensors, str(out / "noise.safetensors"))
    _write_json(
        out / "index.json",
        {
            "description": "torch.randn(shape, generator=torch.Generator('cpu').manual_seed(seed), "
            "dtype=torch.float32); sequences draw consecutively from one generator",
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "tensors": "noise.safetensors",
            "cases": cases,
            "sequences": sequences,
        },
    )


def make_schedulers(out: Path) -> None:
    import diffusers
    import torch
    from safetensors.torch import save_file

    _write_json(out / "sd15_scheduler_config.json", SD15_SCHEDULER_CONFIG)
    cases = []
    names = set()
    for kind, steps, overrides, shape, extra in _variants():
        name = _case_name(kind, steps, overrides, extra)
        assert name not in names, name
        names.add(name)
        tensors, meta = _trajectory(kind, steps, overrides, shape, extra)
        save_file(tensors, str(out / f"{name}.safetensors"))
        class_name, implied = KINDS[kind]
        cases.append(
            {
                "name": name,
                "kind": kind,
                "class": class_name,
                "kind_overrides": implied,
                "overrides": overrides,
                "num_inference_steps": steps,
                "shape": shape,
                "latent_seed": LATENT_SEED,
                "generator_seeds": extra.get("generator_seeds", [LATENT_SEED]),
                "model_output_seed": MODEL_SEED,
                "tensors": f"{name}.safetensors",
                **meta,
            }
        )

    schedule_tensors: dict[str, Any] = {}
    schedules = []
    for kind in KINDS:
        for spacing in ("linspace", "leading", "trailing"):
            for steps in SCHEDULE_STEP_COUNTS:
                scheduler = _build(kind, {"timestep_spacing": spacing})
                scheduler.set_timesteps(steps)
                key = f"{kind}/{spacing}/{steps}"
                schedule_tensors[f"{key}/timesteps"] = scheduler.timesteps.clone()
                entry = {
                    "kind": kind,
                    "overrides": {"timestep_spacing": spacing},
                    "num_inference_steps": steps,
                    "key": key,
                    "init_noise_sigma": _as_float(scheduler.init_noise_sigma),
                }
                sigmas = getattr(scheduler, "sigmas", None)
                if isinstance(sigmas, torch.Tensor):
                    schedule_tensors[f"{key}/sigmas"] = sigmas.clone()
                schedules.append(entry)
    save_file(schedule_tensors, str(out / "schedules.safetensors"))

    _write_json(
        out / "index.json",
        {
            "description": "diffusers schedulers from_config(sd15_scheduler_config.json, "
            "**kind_overrides, **overrides); trajectories feed seeded Gaussian model outputs",
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
            "base_config": "sd15_scheduler_config.json",
            "cases": cases,
            "schedules": {"tensors": "schedules.safetensors", "cases": schedules},
        },
    )


def make_fixture(root: Path) -> None:
    """Writes `root/reference/noise/` and `root/reference/schedulers/`, replacing them."""
    import torch

    torch.set_num_threads(1)
    for name, writer in (("noise", make_noise), ("schedulers", make_schedulers)):
        out = root / "reference" / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        writer(out)


if __name__ == "__main__":
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "tests" / "fixtures"
    make_fixture(target)
    print(f"wrote {target / 'reference' / 'noise'} and {target / 'reference' / 'schedulers'}")
