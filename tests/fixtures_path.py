"""Where the shared EG3D parity fixtures live, and how tests find them.

Default: ``../shared/fixtures`` beside the repository (as in CI); override with
``DREAMPORTRAIT_FIXTURES``. Without them the parity tests skip, unless
``DREAMPORTRAIT_REQUIRE_FIXTURES=1`` (set by ``.ci/run``) makes their absence a failure.
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("DREAMPORTRAIT_FIXTURES", REPO.parent / "shared" / "fixtures"))
FIXTURE_NAMES = ("eg3d_parity_128", "eg3d_parity_512")


def fixture_prefix(name: str) -> Path:
    prefix = FIXTURES / name
    if not prefix.with_suffix(".safetensors").exists():
        msg = f"EG3D parity fixture {prefix}.safetensors not found (set DREAMPORTRAIT_FIXTURES)"
        if os.environ.get("DREAMPORTRAIT_REQUIRE_FIXTURES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return prefix
