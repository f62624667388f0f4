"""disttrain installs as a wheel: build it, install it into a fresh virtual environment outside the
checkout, and run, from another directory, the plug-in face under torchrun, the Hydra app with
``python -m disttrain`` and the ``disttrain`` console script. The configs ship inside the package.

The fresh environment reuses this environment's installed dependencies (torch & co.) through a
path file, without its editable disttrain: what runs is the wheel's copy, which the test checks."""

from __future__ import annotations

import glob
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.distributed import ROOT

PLUGIN = textwrap.dedent(
    """
    import torch, disttrain
    from torch.utils.data import DataLoader, TensorDataset
    ds = disttrain.setup(strategy="ddp")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=16)
    model, opt, loader = ds.prepare(model, opt, loader)
    for x, y in loader:
        opt.zero_grad()
        ds.backward(torch.nn.functional.mse_loss(model(x), y))
        opt.step()
    print(f"rank {ds.rank} of {ds.world_size} from {disttrain.__file__} ok", flush=True)
    """
)


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.timeout(600)
def test_wheel_installs_outside_the_checkout_and_runs_both_faces(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = glob.glob(str(dist / "disttrain-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    fresh_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           tmp_path, dict(os.environ)).stdout.strip())
    # install the wheel with this environment's pip into the fresh one (no index: nothing downloaded)
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(fresh_site), wheel],
         tmp_path, dict(os.environ))
    (fresh_site / "_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    scripts = fresh_site / "bin"  # pip --target puts console scripts here
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                          "MASTER_PORT", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")

    where = _run([str(python), "-c", "import disttrain, disttrain.registry as r; print(disttrain.__file__); "
                  "print(r.available('strategy'))"], elsewhere, env).stdout
    assert str(fresh_site) in where and str(ROOT) not in where, where
    assert "'ddp'" in where and "'fsdp'" in where  # the configs came with the wheel

    (elsewhere / "plugin.py").write_text(PLUGIN)
    out = _run([str(python), "-m", "disttrain.torchrun", "--standalone", "--nproc_per_node=2", "plugin.py"],
               elsewhere, env).stdout
    assert out.count(f"of 2 from {fresh_site}") == 2, out

    _run([str(python), "-m", "disttrain", "strategy=single", "experiment=regression_exact", "trainer.max_epochs=1",
          "hydra.run.dir=app-run"], elsewhere, env)
    assert (elsewhere / "app-run" / "summary.json").is_file()
    console = scripts / "disttrain"
    _run([str(python), str(console), "strategy=single", "experiment=regression_exact", "trainer.max_epochs=1",
          "hydra.run.dir=script-run"], elsewhere, env)
    assert (elsewhere / "script-run" / "summary.json").is_file()
