"""Every student walkthrough in docs/walkthroughs runs to the end and checks its own numbers."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WALKS = sorted((ROOT / "docs" / "walkthroughs").glob("*.py"))


def test_there_is_a_walkthrough_per_landed_method():
    from refsnn.methods import METHODS
    have = {p.stem for p in WALKS}
    landed = {m for m, ref in METHODS.items()
              if (ROOT / (ref.module.replace(".", "/") + ".py")).exists()}
    assert landed <= have, f"methods without a walkthrough: {sorted(landed - have)}"


@pytest.mark.parametrize("path", WALKS, ids=[p.stem for p in WALKS])
def test_walkthrough_runs(path, tmp_path):
    res = subprocess.run([sys.executable, str(path), str(tmp_path / f"{path.stem}.png")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert len(res.stdout.splitlines()) > 10, "a walkthrough prints its numbers"
