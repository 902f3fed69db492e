"""Deterministic test images for the captioner references, and the preprocessing references.

The images are drawn with numpy (no font or anti-aliasing code that could change between Pillow
versions) and cover what an image decoder and a resize port must get right: sizes above and below
the model's input size, odd aspect ratios, grayscale, RGBA (transformers composites alpha on white),
16-bit PNGs (RGB and grayscale: Pillow reduces and clips them in different ways) and a CMYK JPEG.

`write_preprocess_references` stores, for every image, the RGB array transformers works from and the
pixel_values each captioner's image processor produces (both transformers 5 backends: torchvision,
the default, and PIL, the transformers 4 behaviour).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

IMAGES_DIR = "images"

# Caption reference batches (image names below). "five" mixes modes so the processors'
# conversions (grayscale, RGBA, CMYK, 16-bit) feed the captions too.
REFERENCE_BATCHES = {
    "one": ["landscape"],
    "five": ["portrait", "gray", "rgba", "cmyk", "rgb16"],
}
PROMPT = "a photo of"
MAX_NEW_TOKENS = 16


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    return y / max(height - 1, 1), x / max(width - 1, 1)


def _landscape(height: int, width: int) -> np.ndarray:
    """Sky gradient, ground, and a sun: smooth regions plus hard edges."""
    y, x = _grid(height, width)
    img = np.zeros((height, width, 3))
    img[..., 0] = 90 + 80 * y
    img[..., 1] = 150 + 60 * y
    img[..., 2] = 250 - 40 * y
    ground = y > 0.62 + 0.08 * np.sin(6 * x)
    img[ground] = np.stack([40 + 60 * x, 140 - 30 * y, 40 + 0 * x], axis=-1)[ground]
    sun = (x - 0.75) ** 2 + (y - 0.25) ** 2 < 0.015
    img[sun] = [255, 220, 60]
    return img


def _stripes(height: int, width: int) -> np.ndarray:
    y, x = _grid(height, width)
    img = np.zeros((height, width, 3))
    img[..., 0] = 128 + 127 * np.sign(np.sin(14 * x))
    img[..., 1] = 255 * y
    img[..., 2] = 255 * (1 - x) * y
    disk = (x - 0.5) ** 2 + (y - 0.6) ** 2 < 0.05
    img[disk] = [220, 30, 30]
    return img


def _draw() -> list[dict[str, Any]]:
    """Name, file, what it exercises, and the pixel data to encode."""
    rng = np.random.default_rng(20230717)
    gray_y, gray_x = _grid(56, 56)
    gray = 255 * (0.5 + 0.5 * np.cos(9 * np.hypot(gray_y - 0.5, gray_x - 0.5)))
    gray[(np.floor(gray_y * 7) + np.floor(gray_x * 7)) % 2 == 0] *= 0.6
    rgba = np.zeros((40, 48, 4))
    rgba[..., :3] = _stripes(40, 48)[..., ::-1]
    a_y, a_x = _grid(40, 48)
    rgba[..., 3] = 255 * np.clip(1.5 * a_x - 0.25, 0, 1)  # fully transparent on the left, opaque right
    rgb16 = _landscape(38, 50)[..., ::-1] * 257 + rng.integers(0, 256, (38, 50, 3))  # low byte matters
    gray16_y, gray16_x = _grid(36, 36)
    # Values both below and above 255: Pillow's I;16 -> RGB conversion clips instead of scaling.
    gray16 = 600 * gray16_x * gray16_y + 20 * rng.random((36, 36))
    return [
        {"name": "landscape", "file": "landscape.png", "mode": "RGB", "pixels": _landscape(48, 64)},
        {"name": "portrait", "file": "portrait.png", "mode": "RGB", "pixels": _stripes(72, 40)},
        {"name": "tiny_noise", "file": "tiny_noise.png", "mode": "RGB",
         "pixels": rng.integers(0, 256, (13, 20, 3)).astype(np.float64)},
        {"name": "thin", "file": "thin.png", "mode": "RGB", "pixels": _stripes(80, 12)[:, :, ::-1]},
        {"name": "gray", "file": "gray.png", "mode": "L", "pixels": gray},
        {"name": "rgba", "file": "rgba.png", "mode": "RGBA", "pixels": rgba},
        {"name": "rgb16", "file": "rgb16.png", "mode": "RGB;16", "pixels": rgb16},
        {"name": "gray16", "file": "gray16.png", "mode": "I;16", "pixels": gray16},
        {"name": "cmyk", "file": "cmyk.jpg", "mode": "CMYK",
         "pixels": np.concatenate([255 - _landscape(60, 44), 30 * _grid(60, 44)[0][..., None]], axis=-1)},
    ]


def image_files() -> dict[str, str]:
    """Image name -> path relative to the preprocess reference directory."""
    return {image["name"]: f"{IMAGES_DIR}/{image['file']}" for image in _draw()}


def check_stopping(cases: list[dict[str, Any]], eos) -> None:
    """The caption references must exercise what the Rust decoder has to get right: rows that stop
    early (per-row stopping), rows that run to max_new_tokens, and no empty caption without a
    prompt."""
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    stopped = full = 0
    for case in cases:
        for row in case["new_ids"]:
            if row[0] in eos_ids and not case["prompts"]:
                raise AssertionError(f"{case['name']}: a caption is empty (EOS first)")
            ended = any(t in eos_ids for t in row[:-1])
            stopped += ended
            full += not ended
    if not stopped or not full:
        raise AssertionError(f"references need rows that stop early ({stopped}) and rows that do not ({full})")


def reference_cases(prompt_kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every caption reference case: batch, prompt kind ("none", "photo": PROMPT on every row,
    "mixed": prompts of different lengths) and the exact `generate` keyword arguments."""
    cases = []
    for search, extra in (("greedy", {"num_beams": 1}), ("beam3", {"num_beams": 3})):
        for batch in ("one", "five"):
            for prompt in prompt_kinds:
                if prompt == "mixed" and batch == "one":
                    continue
                cases.append({"name": f"{search}_{batch}_{prompt}", "batch": batch, "prompt": prompt,
                              "generate_kwargs": {"max_new_tokens": MAX_NEW_TOKENS, **extra}})
    constraints = {"min_new_tokens": 10, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2}
    cases += [
        {"name": "greedy_five_none_constraints", "batch": "five", "prompt": "none",
         "generate_kwargs": {"max_new_tokens": MAX_NEW_TOKENS, "num_beams": 1, **constraints}},
        {"name": "beam3_five_none_constraints", "batch": "five", "prompt": "none",
         "generate_kwargs": {"max_new_tokens": MAX_NEW_TOKENS, "num_beams": 3, **constraints}},
        {"name": "beam3_five_none_length_penalty2", "batch": "five", "prompt": "none",
         "generate_kwargs": {"max_new_tokens": MAX_NEW_TOKENS, "num_beams": 3, "length_penalty": 2.0}},
        {"name": "beam3_five_photo_length_penalty0.5_early", "batch": "five", "prompt": "photo",
         "generate_kwargs": {"max_new_tokens": MAX_NEW_TOKENS, "num_beams": 3, "length_penalty": 0.5,
                             "early_stopping": True}},
    ]
    return cases


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    height, width, _ = pixels.shape
    data = np.clip(np.round(pixels), 0, 65535).astype(">u2")
    raw = b"".join(b"\x00" + data[row].tobytes() for row in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_images(out_dir: Path) -> list[dict[str, Any]]:
    """Write every test image under out_dir/images; return their descriptions (without pixels)."""
    from PIL import Image

    images_dir = Path(out_dir) / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    described = []
    for image in _draw():
        path = images_dir / image["file"]
        pixels = image["pixels"]
        mode = image["mode"]
        if mode == "RGB;16":
            path.write_bytes(_png16_rgb(pixels))
        elif mode == "I;16":
            Image.fromarray(np.clip(np.round(pixels), 0, 65535).astype(np.uint16)).save(path, optimize=False)
        elif mode == "CMYK":
            Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), mode="CMYK").save(path, quality=90)
        else:
            Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), mode=mode).save(path, optimize=False)
        with Image.open(path) as opened:
            described.append({
                "name": image["name"], "file": f"{IMAGES_DIR}/{image['file']}", "width": opened.width,
                "height": opened.height, "pil_mode": opened.mode, "encoded_as": mode,
            })
    return described


def load_image(root: Path, file: str):
    from PIL import Image

    with Image.open(Path(root) / file) as image:
        image.load()
        return image.copy()


def model_card_rgb(image):
    """What the nlpconnect/vit-gpt2 model card does before its processor: Pillow's convert("RGB")
    (which drops alpha, unlike transformers' convert_to_rgb which composites on white)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def write_preprocess_references(
    out_dir: Path, processors: dict[str, tuple[Callable[[str], Any], list[str]]]
) -> None:
    """reference/preprocess: images, their RGB arrays, and every processor's pixel_values.

    processors maps a name to (factory, variants): factory(backend) -> image processor, backend
    "torchvision" or "pil"; variants among "as_loaded" and "model_card_rgb". Each processor's
    settings are recorded so a port can be driven from the index.
    """
    import torch
    from safetensors.numpy import save_file
    from transformers.image_transforms import convert_to_rgb

    out_dir = Path(out_dir)
    images = write_images(out_dir)
    tensors: dict[str, np.ndarray] = {}
    for described in images:
        image = load_image(out_dir, described["file"])
        # What transformers' do_convert_rgb=True works from (alpha composited on white).
        tensors[f"{described['name']}.rgb"] = np.ascontiguousarray(convert_to_rgb(image, return_numpy=True))
        tensors[f"{described['name']}.model_card_rgb"] = np.ascontiguousarray(np.array(model_card_rgb(image)))
    outputs = []
    for proc_name, (factory, variants) in processors.items():
        for backend in ("torchvision", "pil"):
            processor = factory(backend)
            settings = json.loads(processor.to_json_string())
            for described in images:
                for variant in variants:
                    image = load_image(out_dir, described["file"])
                    if variant == "model_card_rgb":
                        if described["pil_mode"] == "RGB":
                            continue  # identical to as_loaded
                        image = model_card_rgb(image)
                    key = f"{proc_name}.{backend}.{variant}.{described['name']}"
                    entry = {"processor": proc_name, "backend": backend, "variant": variant,
                             "image": described["name"]}
                    try:
                        pixel_values = processor(image, return_tensors="pt")["pixel_values"]
                    except (ValueError, RuntimeError) as error:
                        entry["error"] = f"{type(error).__name__}: {error}"
                    else:
                        tensors[key] = pixel_values.to(torch.float32).numpy()
                        entry["tensor"] = key
                        entry["shape"] = list(pixel_values.shape)
                    outputs.append(entry)
            outputs_settings = {"processor": proc_name, "backend": backend, "settings": settings}
            outputs.append(outputs_settings)
    save_file(tensors, str(out_dir / "pixel_values.safetensors"))
    index = {
        "generator": "models/cip_export/test_images.py",
        "about": (
            "Each image is opened with Pillow and passed, as a PIL image, to the image processor. "
            "'<name>.rgb' is transformers' convert_to_rgb(image) (uint8 HWC, alpha composited on "
            "white); '<name>.model_card_rgb' is Pillow's image.convert('RGB') (alpha dropped). "
            "Variant 'as_loaded' passes the opened image; 'model_card_rgb' converts it first, as "
            "the nlpconnect/vit-gpt2 model card does. An 'error' entry means transformers raised."
        ),
        "tensors": "pixel_values.safetensors",
        "images": images,
        "processors": [o for o in outputs if "settings" in o],
        "outputs": [o for o in outputs if "settings" not in o],
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
