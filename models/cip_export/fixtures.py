"""`export.py fixtures`: build every tiny model and reference output, then record their digests.

Each fixture is a module of this package with `make_fixture(root: Path)`. It writes under root
(e.g. sd writes root/sd-tiny/ and root/reference/sd/). Afterwards root/FIXTURES.toml lists, per
fixture, every file it wrote with its size and blake3, so a test can regenerate a fixture into a
temporary directory and compare it with the committed set byte for byte.

Which files a fixture wrote is observed, not declared: a file counts as the fixture's if it is new
or its size or mtime changed while make_fixture ran. Regenerate into an empty directory when a
fixture drops files: stale files from an older run are not deleted here (a fixture module owns its
directories and may clear them itself, as sd does).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import random
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from .common import file_blake3

# Generation order: noise_schedulers and classifier do not depend on sd, but sd first keeps the
# heaviest, most-shared fixture's timings at the top of the log.
FIXTURE_NAMES = ["sd", "noise_schedulers", "classifier", "blip2", "vit_gpt2"]
DIGEST_FILE = "FIXTURES.toml"
DIGEST_FORMAT = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="fixture root, e.g. tests/fixtures")
    parser.add_argument(
        "--only",
        nargs="+",
        action="extend",
        choices=FIXTURE_NAMES,
        metavar="NAME",
        help=f"build only these fixtures (of {', '.join(FIXTURE_NAMES)}); the others keep their "
        f"entries in {DIGEST_FILE}",
    )


def run(args: argparse.Namespace) -> None:
    names = [n for n in FIXTURE_NAMES if n in set(args.only)] if args.only else list(FIXTURE_NAMES)
    missing = missing_modules(names)
    if missing:
        raise SystemExit(
            "export.py fixtures: no module for fixture(s) "
            + ", ".join(f"{n} (models/cip_export/{n}.py)" for n in missing)
            + f" in this checkout; pass --only with the others: {', '.join(n for n in names if n not in missing)}"
        )
    digests = generate(Path(args.out), names, log=print)
    for name in names:
        entry = digests[name]
        print(f"{name}: {len(entry['files'])} files, {entry['bytes'] / 1e6:.2f} MB")
    print(f"wrote {Path(args.out) / DIGEST_FILE}")


def missing_modules(names: list[str]) -> list[str]:
    """Fixture names whose module is not in this checkout (other families are added in parallel)."""
    missing = []
    for name in names:
        if importlib.util.find_spec(f"cip_export.{name}") is None:
            missing.append(name)
    return missing


def seed_everything(seed: int = 0) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def generate(root: Path, names: list[str], log=lambda _msg: None) -> dict[str, dict[str, Any]]:
    """Run make_fixture for each name into root; update root/FIXTURES.toml; return the new entries.

    Single-threaded torch and a fresh seed per fixture: outputs must not depend on the machine's
    core count or on which fixtures ran before.
    """
    import torch

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    entries: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            module = importlib.import_module(f"cip_export.{name}")
            before = _snapshot(root)
            seed_everything(0)
            started = time.monotonic()
            module.make_fixture(root)
            after = _snapshot(root)
            produced = sorted(p for p, stat in after.items() if before.get(p) != stat)
            entries[name] = describe_files(root, produced)
            log(f"{name}: made in {time.monotonic() - started:.1f} s")
    finally:
        torch.set_num_threads(threads)
    write_digest_file(root, entries)
    return entries


def describe_files(root: Path, paths: list[str]) -> dict[str, Any]:
    files = {p: file_blake3(root / p) for p in paths}
    return {"bytes": sum((root / p).stat().st_size for p in paths), "files": files}


def read_digest_file(root: Path) -> dict[str, dict[str, Any]]:
    path = Path(root) / DIGEST_FILE
    if not path.exists():
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f).get("fixtures", {})


def write_digest_file(root: Path, entries: dict[str, dict[str, Any]]) -> Path:
    """Merge entries into root/FIXTURES.toml, keeping fixtures that were not regenerated."""
    merged = read_digest_file(root)
    merged.update(entries)
    document = {
        "format": DIGEST_FORMAT,
        "fixtures": {name: merged[name] for name in sorted(merged)},
    }
    path = Path(root) / DIGEST_FILE
    header = (
        "# Written by `python models/export.py fixtures --out <this dir>`: per fixture, the blake3\n"
        "# of every file it produced. models/tests/test_fixtures.py regenerates and compares.\n"
    )
    path.write_text(header + tomli_w.dumps(document), encoding="utf-8")
    return path


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and p.name != DIGEST_FILE
    }
