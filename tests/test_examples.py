"""The README's promise: adapting a plain loop takes at most 5 changed lines, and it runs."""

from __future__ import annotations

import difflib
import math
import re

import pytest

from tests.distributed import ROOT, run_torchrun


def test_adapting_the_plain_loop_changes_at_most_five_lines():
    plain = (ROOT / "examples" / "plain_loop.py").read_text().splitlines()
    adapted = (ROOT / "examples" / "adapted_loop.py").read_text().splitlines()
    diff = [line for line in difflib.unified_diff(plain, adapted, lineterm="", n=0) if line[:3] not in ("---", "+++")]
    added = [line for line in diff if line.startswith("+")]
    removed = [line for line in diff if line.startswith("-")]
    assert len(added) <= 5 and len(removed) <= len(added), diff
    readme = (ROOT / "README.md").read_text()
    for line in added + removed:  # the README shows this very diff
        assert line.strip() in readme, f"README does not show {line!r}"


@pytest.mark.slow  # the same script runs under every strategy in test_plugin.py, and under torchrun from the wheel
@pytest.mark.timeout(240)
def test_adapted_loop_runs_under_torchrun(tmp_path):
    res = run_torchrun([], nproc=2, cwd=tmp_path, module="examples.adapted_loop")
    assert res.returncode == 0, res.stdout[-3000:]
    # one line per rank; unbuffered prints from two ranks may interleave on one output line
    losses = [float(v) for v in re.findall(r"epoch 4 loss (\d+\.\d{4})", res.stdout)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), res.stdout[-2000:]
