"""A model that is not ours in the app: examples/char_gpt (a GPT returning (logits, loss), its own
config directory, data facts, an optimizer factory with parameter groups) trains under each
strategy by changing only ``strategy=``."""

from __future__ import annotations

import json
import math

import pytest

from tests.distributed import run_torchrun

CHAR_GPT = ["--config-dir", "examples/char_gpt/conf", "experiment=char_gpt", "trainer.progress_bar=false",
            "trainer.max_epochs=2"]
STRATEGIES = {
    "ddp": [],
    "fsdp": ["strategy.wrap=[Block]"],
    "model_parallel": [],  # placement: auto splits the GPT by measured cost
    "parameter_server": [],  # colocated shards, staleness 4
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", [pytest.param(s, marks=pytest.mark.slow) if s == "ddp" else s
                                      for s in STRATEGIES])  # ddp: the README loop and the app tests
def test_char_gpt_trains_through_the_app(strategy, tmp_path):
    from tests.distributed import ROOT

    run = tmp_path / "run"
    res = run_torchrun([*CHAR_GPT, f"strategy={strategy}", *STRATEGIES[strategy], f"hydra.run.dir={run}"],
                       nproc=2, cwd=ROOT, timeout=280)
    assert res.returncode == 0, res.stdout[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    uniform = math.log(85)  # the corpus has 85 distinct characters
    assert summary["eval_loss"] < uniform - 0.8, summary  # learned far beyond guessing
    assert summary["eval_accuracy"] > 1 / 85 * 5, summary
    assert "data facts: {'vocab_size': 85" in res.stdout
