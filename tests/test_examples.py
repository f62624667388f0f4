"""The README's promise: adapting a plain loop takes at most 5 changed lines, and it runs."""

from __future__ import annotations

import difflib

import pytest

from tests.distributed import ROOT, run_torchrun


def test_adapting_the_plain_loop_changes_at_most_five_lines():
    plain = (ROOT / "examples" / "plain_loop.py").read_text().splitlines()
    adapted = (ROOT / "examples" / "adapted_loop.py").read_text().splitlines()
    diff = [l for l in difflib.unified_diff(plain, adapted, lineterm="", n=0) if l[:3] not in ("---", "+++")]
    added = [l for l in diff if l.startswith("+")]
    removed = [l for l in diff if l.startswith("-")]
    assert len(added) <= 5 and len(removed) <= len(added), diff
    readme = (ROOT / "README.md").read_text()
    for line in added + removed:  # the README shows this very diff
        assert line.strip() in readme, f"README does not show {line!r}"


@pytest.mark.timeout(240)
def test_adapted_loop_runs_under_torchrun(tmp_path):
    res = run_torchrun([], nproc=2, cwd=tmp_path, module="examples.adapted_loop")
    assert res.returncode == 0, res.stdout[-3000:]
    losses = [float(l.split()[-1]) for l in res.stdout.splitlines() if l.startswith("epoch 4 loss")]
    assert len(losses) == 2  # one line per rank
