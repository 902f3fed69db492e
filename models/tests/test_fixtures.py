"""The committed fixtures are exactly what the generator makes, and they stay small."""

from __future__ import annotations

import pytest
from conftest import FIXTURES_DIR

from cip_export import common, fixtures

SIZE_BUDGET_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def committed():
    entries = fixtures.read_digest_file(FIXTURES_DIR)
    if not entries:
        pytest.fail(f"{FIXTURES_DIR / fixtures.DIGEST_FILE} is missing or empty: run "
                    "`python models/export.py fixtures --out tests/fixtures`")
    return entries


@pytest.mark.parametrize("name", fixtures.FIXTURE_NAMES)
def test_regeneration_reproduces_committed_digests(name, committed, regenerated_fixtures):
    _root, digests, missing = regenerated_fixtures
    if name in missing:
        pytest.skip(f"fixture {name!r} not regenerated: {missing[name]}")
    if name not in committed:
        pytest.fail(f"fixture {name!r} has a module but no entry in tests/fixtures/{fixtures.DIGEST_FILE}: "
                    f"run `python models/export.py fixtures --out tests/fixtures --only {name}` and commit")
    want, got = committed[name]["files"], digests[name]["files"]
    assert sorted(got) == sorted(want), "a different set of files was produced"
    changed = sorted(path for path in want if got[path] != want[path])
    assert not changed, f"regenerated files differ from the committed ones: {changed}"


def test_committed_files_match_their_digests(committed):
    for name, entry in committed.items():
        for path, digest in entry["files"].items():
            file = FIXTURES_DIR / path
            assert file.is_file(), f"{name}: {path} is listed but missing"
            assert common.file_blake3(file) == digest, f"{name}: {path} was edited by hand or is stale"


def test_fixtures_fit_the_size_budget():
    total = sum(p.stat().st_size for p in FIXTURES_DIR.rglob("*") if p.is_file())
    assert total <= SIZE_BUDGET_BYTES, f"tests/fixtures holds {total / 1e6:.1f} MB, budget 10 MiB"


def test_digest_file_records_what_generate_wrote(regenerated_fixtures):
    root, digests, _missing = regenerated_fixtures
    assert fixtures.read_digest_file(root) == digests
