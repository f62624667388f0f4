"""Every config value is type- and range-checked before any process group starts, with one message
naming the key, the value and the rule (``disttrain.cli.validate``, called on every rank first).
In-process here (no launch needed: validation runs before anything distributed); test_cli checks
under torchrun that a bad value exits 2 on every rank."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from disttrain.cli import register_resolvers, validate
from disttrain.env import DistEnv
from disttrain.errors import ConfigError
from disttrain.registry import CONF_DIR

TWO_RANKS = DistEnv(rank=0, world_size=2, local_world_size=2)


def _compose(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=False)


BAD = [
    # (overrides, the message names key, value and rule)
    (["trainer.max_epochs=abc"], "trainer.max_epochs='abc': expected an integer"),
    (["trainer.max_epochs=1.5"], "trainer.max_epochs=1.5: expected an integer"),
    (["trainer.max_steps=-3"], "trainer.max_steps=-3: must be >= 1 or null"),
    (["trainer.grad_clip=true"], "trainer.grad_clip=True: expected a number or null"),
    (["trainer.checkpoint_keep_last=0"], "trainer.checkpoint_keep_last=0: must be >= 1 or null"),
    (["+trainer.max_epoch=3"], "trainer.max_epoch is not an option of trainer: known options are"),
    (["data.batch_size=abc"], "data.batch_size='abc': expected an integer"),
    (["data.batch_size=0"], "data.batch_size=0: must be >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1: must be >= 0"),
    (["dist.timeout_s=-5"], "dist.timeout_s=-5: must be > 0"),
    (["dist.timeout_s=soon"], "dist.timeout_s='soon': expected a number"),
    (["trainer.hang_timeout_s=0"], "trainer.hang_timeout_s=0: must be > 0 seconds, or null"),
    (["trainer.straggler_margin=-1"], "trainer.straggler_margin=-1: must be >= 0"),
    (["trainer.peak_flops=0"], "trainer.peak_flops=0: must be > 0"),
    (["dist.backend=mpx"], "dist.backend='mpx': expected one of 'auto', 'gloo', 'nccl', 'mpi'"),
    (["accelerator=tpu"], "accelerator='tpu': expected one of 'auto', 'cpu', 'cuda'"),
    (["precision=fp8"], "precision='fp8': expected one of '32', 'bf16'"),
    (["seed=1.5"], "seed=1.5: expected an integer"),
    (["strategy=model_parallel", "precision=bf16"], "precision=bf16: strategy=model_parallel trains in fp32"),
    (["data.metric=f1"], "data.metric='f1': expected one of"),
    (["strategy.bucket_cap_mb=big"], "strategy.bucket_cap_mb='big': expected a number"),
    (["+strategy.bucket_mb=3"], "strategy.bucket_mb is not an option of strategy: known options are"),
    (["strategy=parameter_server", "strategy.num_servers=two"], "strategy.num_servers='two': expected an integer"),
    (["model._target_=disttrain.models.Nope"], "model._target_='disttrain.models.Nope' cannot be imported"),
    (["+model.widht=3"], "model.widht is not an option of model: known options are"),
    (["model.depth=two"], "model.depth='two': expected an integer"),
    (["optimizer.lr=-0.1"], "optimizer: Invalid learning rate: -0.1"),
    (["+data.dataset.test_fractoin=0.3"], "data.dataset.test_fractoin is not an option of data.dataset"),
    (["scheduler=step", "scheduler.step_size=often"], "scheduler.step_size='often': expected an integer"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][-1] for b in BAD])
def test_bad_value_is_one_message_naming_key_value_and_rule(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(_compose(overrides), TWO_RANKS)
    assert message in str(info.value)


@pytest.mark.parametrize("overrides", [[], ["precision=32"], ["precision=bf16"], ["trainer.max_steps=5"],
                                       ["dist.timeout_s=30"], ["dist.num_threads=null"], ["trainer.grad_clip=1"]])
def test_good_values_pass(overrides):
    strategy, trainer_cfg = validate(_compose(overrides), TWO_RANKS)
    assert strategy.name == "ddp" and trainer_cfg.max_epochs >= 1


def test_unwritable_checkpoint_directory_is_refused_before_training(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        import os

        if os.access(locked, os.W_OK):  # root ignores the mode bits: use a path under a file instead
            (tmp_path / "file").write_text("")
            locked = tmp_path / "file"
        with pytest.raises(ConfigError, match="cannot be written"):
            validate(_compose([]), TWO_RANKS, run_dir=locked / "run")
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_fresh_run_into_a_directory_with_checkpoints_is_refused(tmp_path):
    from disttrain import checkpoint as ckpt

    ckpt.save({"step": 550}, tmp_path / "run" / "checkpoints", "step_00000550.pt")
    with pytest.raises(ConfigError, match="already holds 1 checkpoint.*trainer.resume=auto"):
        validate(_compose([]), TWO_RANKS, run_dir=tmp_path / "run")
    validate(_compose(["trainer.resume=auto"]), TWO_RANKS, run_dir=tmp_path / "run")  # continuing it is fine
