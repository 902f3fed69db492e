#!/usr/bin/env python3
"""cip's export tool: Hugging Face / torchvision checkpoints -> cip model directories (ONNX).

    python models/export.py [--online] sd --out models/sd15 --dtype fp16
    python models/export.py [--online] blip2 | vit-gpt2 | classifier ...
    python models/export.py fixtures --out tests/fixtures [--only sd ...]

Each family lives in its own module (models/cip_export/<module>.py) with add_arguments(parser) and
export(args). Modules are imported only when their subcommand runs: torch and diffusers take seconds
to import, and a family whose module is missing must not break the others. See models/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# Make `cip_export` importable however this file is run (python models/export.py from the root).
sys.path.insert(0, str(Path(__file__).resolve().parent))

# subcommand -> module in cip_export, and its help line.
FAMILIES = {
    "sd": ("sd", "Stable Diffusion pipeline -> optimum-layout ONNX directory"),
    "blip2": ("blip2", "BLIP-2 captioner -> vision + decoder-with-past ONNX directory"),
    "vit-gpt2": ("vit_gpt2", "ViT-GPT2 captioner -> vision + decoder-with-past ONNX directory"),
    "classifier": ("classifier", "torchvision classifier -> inference and train-step ONNX graphs"),
    "bench": ("bench", "full-width random-weight benchmark models and reference timings (cip bench)"),
}


def _family_module(module_name: str):
    try:
        return importlib.import_module(f"cip_export.{module_name}")
    except ModuleNotFoundError as e:
        if e.name == f"cip_export.{module_name}":
            raise SystemExit(
                f"export.py: this checkout has no models/cip_export/{module_name}.py, so this family "
                f"cannot be exported from it"
            ) from None
        raise


def build_parser(family_for_options: str | None = None) -> argparse.ArgumentParser:
    """The CLI. Only the chosen family's module is imported, to add its options.

    argparse needs a subparser's options before parsing, so main() peeks at argv for the family
    and imports just that module.
    """
    parser = argparse.ArgumentParser(
        prog="export.py",
        description="Export models to cip model directories (ONNX + cip-model.toml); see models/README.md.",
    )
    parser.add_argument(
        "--online",
        action="store_true",
        help="allow Hugging Face hub downloads (default: offline, HF_HUB_OFFLINE=1, so a missing "
        "model fails at once instead of retrying for minutes)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (module_name, help_line) in FAMILIES.items():
        family_parser = sub.add_parser(command, help=help_line, description=help_line)
        if command == family_for_options:
            _family_module(module_name).add_arguments(family_parser)
        family_parser.set_defaults(module=module_name)
    fixtures = sub.add_parser(
        "fixtures",
        help="build the tiny test models and reference outputs",
        description="Build the tiny random-weight models and reference outputs into DIR, then write "
        "DIR/FIXTURES.toml (blake3 of every file each fixture produced).",
    )
    from cip_export.fixtures import add_arguments as add_fixture_arguments

    add_fixture_arguments(fixtures)
    fixtures.set_defaults(module=None)
    return parser


def _chosen_command(argv: list[str]) -> str | None:
    """The first argument naming a subcommand, skipping global flags."""
    for arg in argv:
        if arg in FAMILIES or arg == "fixtures":
            return arg
        if not arg.startswith("-"):
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = _chosen_command(argv)
    # Go offline before any family module is imported: huggingface_hub reads HF_HUB_OFFLINE once,
    # at import time.
    global_flags = argv[: argv.index(chosen)] if chosen in argv else argv
    if "--online" not in global_flags:
        from cip_export import common

        common.setup_offline()
    parser = build_parser(family_for_options=chosen if chosen in FAMILIES else None)
    args = parser.parse_args(argv)
    if args.command == "fixtures":
        from cip_export import fixtures

        fixtures.run(args)
    else:
        _family_module(args.module).export(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
