"""refsnn/runtime.py: with keep_freed_memory, a step's large arrays freed and allocated again
come back from the heap (no page faults), where glibc's defaults fault their pages in again; a
user's MALLOC_* setting wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from refsnn.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "1" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():                              # a step's activations: three 24 MB arrays, then freed
    arrays = [np.ones(3_000_000) for _ in range(3)]
    return sum(float(x[0]) for x in arrays)
for _ in range(3):                       # glibc adapts its thresholds after frees: settle
    step()
f0 = faults()
step()                                   # about 17,600 pages
print(applied, faults() - f0)
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def _probe(apply: bool, **env):
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run_env.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if apply else "0"], env=run_env,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@glibc
def test_freed_arrays_come_back_without_page_faults():
    applied, with_policy = _probe(True)
    _, without = _probe(False)
    assert applied
    assert without >= 20                 # the defaults fault them in again (huge pages: fewer)
    assert with_policy < 0.1 * without


@glibc
def test_a_users_malloc_setting_wins():
    applied, _ = _probe(True, MALLOC_TRIM_THRESHOLD_="131072")
    assert not applied
