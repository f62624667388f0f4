"""The CUDA paths, on whatever GPUs the machine has (skipped where CUDA is unavailable, as in CI).

Each test checks against the same oracles as the CPU tests: plain single-process torch on CPU.
GPU and CPU float32 arithmetic differ in summation order, hence a tolerance of 1e-5 instead of
the CPU tests' 1e-6. Tests needing two GPUs say so and skip on one.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from tests.distributed import run_python, run_torchrun
from tests.oracle import LR, assert_same_state, sgd_reference
from tests.oracle import regression_data as _data
from tests.oracle import tiny_model as _model
from tests.test_cli import _only_run_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
ATOL = 1e-5
K_STEPS = 6


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """No TF32 in matmuls: the oracle comparison needs float32 products on the GPU too."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# ---------------------------------------------------------------------- plug-in API on one GPU
@pytest.mark.timeout(120)
def test_session_on_gpu_matches_cpu_oracle():
    import disttrain

    ds = disttrain.setup(strategy="single", accelerator="cuda", seed=0)
    assert ds.device.type == "cuda"
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(_data(), batch_size=16, shuffle=True)
    model, optimizer, loader = ds.prepare(model, optimizer, loader)
    seen = []
    for x, y in loader:
        assert x.device.type == "cuda"  # the prepared loader moves batches to the device
        optimizer.zero_grad()
        ds.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        seen.append([(x.cpu(), y.cpu())])
        if len(seen) == K_STEPS:
            break
    got = {k: v.detach().cpu() for k, v in ds.unwrap(model).state_dict().items()}
    ds.close()
    assert_same_state(got, sgd_reference(seen), atol=ATOL)


@pytest.mark.timeout(120)
def test_bf16_autocasts_on_gpu_and_returns_fp32():
    import disttrain

    ds = disttrain.setup(strategy="single", accelerator="cuda", precision="bf16", seed=0)
    model = _model()
    inner_dtypes = []
    model[0].register_forward_hook(lambda m, i, o: inner_dtypes.append(o.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = ds.prepare(model, optimizer)
    x, y = _data().tensors
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        out = model(x[:64].to(ds.device))
        assert out.dtype == torch.float32  # as Accelerate: autocast inside, fp32 out
        loss = nn.functional.mse_loss(out, y[:64].to(ds.device))
        ds.backward(loss)
        optimizer.step()
        losses.append(loss.item())
    ds.close()
    assert set(inner_dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------- model parallel, one process
@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule,m", [("gpipe", 1), ("gpipe", 4), ("1f1b", 4)])
def test_stages_on_gpu_and_cpu_equal_unsplit(schedule, m):
    """The user's placement mixes devices: layers on cuda:0, the middle on the CPU, the tail on
    the last GPU. Gradients, weights and losses equal the unsplit model's on the CPU."""
    from disttrain.env import DistEnv
    from disttrain.strategies.model_parallel import ModelParallelStrategy
    from disttrain.timing import StepTimer
    from tests.test_model_parallel import RecordingSGD, batches, factory, reference

    last = f"cuda:{GPUS - 1}"
    placement = [
        {"modules": ["layers.0-1"], "device": "cuda:0"},
        {"modules": ["layers.2", "layers.3"], "device": "cpu"},
        {"modules": ["layers.4-6"], "device": last},
    ]
    st = ModelParallelStrategy(placement=placement, microbatches=m, schedule=schedule)
    st.validate(DistEnv())
    st.setup(DistEnv(), torch.device("cuda", 0), "nccl", 30)
    torch.manual_seed(0)
    model = st.build_model(factory)
    assert str(next(model.layers[0].parameters()).device) == "cuda:0"
    assert next(model.layers[2].parameters()).device.type == "cpu"
    init = {k: v.cpu() for k, v in copy.deepcopy(model.state_dict()).items()}
    opt = RecordingSGD(model.parameters())
    losses = [st.train_step(model, opt, [b], nn.CrossEntropyLoss(), None, StepTimer(st.device)).item() for b in batches()]
    want_state, want_grads, want_losses = reference(init)
    names = [n for n, _ in model.named_parameters()]
    for step, grads in enumerate(opt.recorded):
        for n, g in zip(names, grads):
            torch.testing.assert_close(g.cpu(), want_grads[step][n], atol=ATOL, rtol=0, msg=f"grad {n} step {step}")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v.cpu(), want_state[k], atol=ATOL, rtol=0, msg=f"weight {k}")
    assert losses == pytest.approx(want_losses, abs=ATOL)


# ---------------------------------------------------------------------- the Hydra app under torchrun
@pytest.mark.timeout(300)
def test_torchrun_on_gpus_trains_digits(tmp_path):
    """One process per GPU (NCCL when there are two or more), the README's main job."""
    res = run_torchrun(["experiment=digits_ddp", "accelerator=cuda"], nproc=min(GPUS, 2), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-4000:]
    summary = json.loads((_only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.95, summary
    assert "cuda" in res.stdout  # the logged config/device line


@pytest.mark.timeout(120)
def test_more_processes_than_gpus_fails_clearly(tmp_path):
    res = run_torchrun(["experiment=digits_ddp", "accelerator=cuda"], nproc=GPUS + 1, cwd=tmp_path, timeout=100)
    assert res.returncode != 0
    assert f"only {GPUS} GPU(s) are visible" in res.stdout, res.stdout[-3000:]
    assert f"--nproc_per_node={GPUS}" in res.stdout


@pytest.mark.timeout(240)
def test_checkpoint_from_gpu_resumes_on_cpu(tmp_path):
    """Train on the GPU, stop, resume the same run on a CPU-only process: the checkpoint holds
    no device-bound state, and training continues from the saved step."""
    common = ["strategy=single", "experiment=regression_exact", "hydra.run.dir=run", "trainer.checkpoint_every_n_steps=5"]
    first = run_python(["-m", "disttrain", *common, "accelerator=cuda", "trainer.max_steps=10"], cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_python(
        ["-m", "disttrain", *common, "accelerator=cpu", "trainer.max_steps=20", "trainer.resume=auto"],
        cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""},
    )
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "resumed from" in out and "at step 10" in out, out[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["eval_mse"] < 1.0, summary


@pytest.mark.timeout(300)
@pytest.mark.skipif(GPUS < 2, reason="DDP over NCCL needs two GPUs (NCCL refuses two ranks on one GPU)")
def test_ddp_nccl_two_gpus_matches_oracle():
    from tests.distributed import run_distributed
    from tests.test_ddp_oracle import _session_worker

    results = run_distributed(_session_worker, 2, 1, timeout=240)
    states = [r[0] for r in results]
    assert_same_state(states[1], states[0], atol=0)
    steps = [[tuple(t.cpu() for t in results[r][1][s]) for r in range(2)] for s in range(K_STEPS)]
    want = sgd_reference(steps)
    assert_same_state({k: v.cpu() for k, v in states[0].items()}, want, atol=ATOL)
