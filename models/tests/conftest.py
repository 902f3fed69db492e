"""Shared, session-scoped setup for the export tool's tests.

Everything expensive (building the tiny pipeline, regenerating fixtures) happens once per session
here, so the Python tier stays at a few minutes on two cores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

MODELS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = MODELS_DIR.parent
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"
EXPORT_PY = MODELS_DIR / "export.py"

sys.path.insert(0, str(MODELS_DIR))

from cip_export import common  # noqa: E402

# Before anything imports huggingface_hub: it reads HF_HUB_OFFLINE once, at import.
common.setup_offline()


@pytest.fixture(scope="session")
def sd_fixture_dir() -> Path:
    path = FIXTURES_DIR / "sd-tiny"
    if not (path / "cip-model.toml").exists():
        pytest.fail(f"{path} is missing: run `python models/export.py fixtures --out tests/fixtures --only sd`")
    return path


@pytest.fixture(scope="session")
def sd_reference_dir() -> Path:
    return FIXTURES_DIR / "reference" / "sd"


@pytest.fixture(scope="session")
def tiny_sd_source(tmp_path_factory) -> Path:
    """The tiny pipeline saved with save_pretrained, as a user's local --source would be."""
    from cip_export import sd

    return sd.save_tiny_source(tmp_path_factory.mktemp("tiny-sd-source") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_pipeline(tiny_sd_source):
    """The torch pipeline the committed sd-tiny was exported from (same seeds, same weights)."""
    from cip_export import sd

    return sd.load_pipeline(str(tiny_sd_source))


@pytest.fixture(scope="session")
def regenerated_fixtures(tmp_path_factory):
    """Every fixture whose module exists, regenerated into a fresh directory by the fixtures command's
    own code path. Returns (root, digests, {missing name: reason})."""
    from cip_export import fixtures

    missing = fixtures.missing_modules(fixtures.FIXTURE_NAMES)
    names = [n for n in fixtures.FIXTURE_NAMES if n not in missing]
    root = tmp_path_factory.mktemp("fixtures")
    digests = fixtures.generate(root, names)
    reasons = {n: f"models/cip_export/{n}.py is not in this checkout" for n in missing}
    return root, digests, reasons
