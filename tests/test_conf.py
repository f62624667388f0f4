"""Every file in conf/ composes and instantiates (the lightning-hydra-template habit)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from disttrain.cli import register_resolvers, validate
from disttrain.env import DistEnv
from disttrain.registry import CONF_DIR, available, build_strategy, instantiate

GROUPS = ["strategy", "model", "data", "optimizer", "scheduler", "trainer", "experiment"]
CASES = [(g, n) for g in GROUPS for n in available(g)]


def _compose(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=False)


@pytest.mark.parametrize("group,name", CASES, ids=[f"{g}/{n}" for g, n in CASES])
def test_config_file_composes_and_instantiates(group, name):
    cfg = _compose([f"{group}={name}"])
    OmegaConf.resolve(cfg)
    strategy = build_strategy(cfg.strategy)  # cheap: no process group, no optional engine import
    assert strategy.name
    model = instantiate(cfg.model, "model")
    assert isinstance(model, torch.nn.Module)
    train, evaluation = instantiate(cfg.data.dataset, "data.dataset")
    x, y = train[0]
    loss = instantiate(cfg.data.loss, "data.loss")
    out = model(x.unsqueeze(0))
    assert torch.isfinite(loss(out, y.unsqueeze(0)))
    opt = instantiate(cfg.optimizer, "optimizer", params=model.parameters())
    assert isinstance(opt, torch.optim.Optimizer)
    if cfg.get("scheduler") and cfg.scheduler.get("_target_"):
        instantiate(cfg.scheduler, "scheduler", optimizer=opt)
    if group in ("strategy", "experiment") and name not in {"single"}:
        return  # these need more than one process to validate; test_cli covers them under torchrun
    validate(cfg, DistEnv())


def test_default_config_validates_for_two_ranks():
    cfg = _compose([])
    strategy, trainer_cfg = validate(cfg, DistEnv(rank=0, world_size=2, local_world_size=2))
    assert strategy.name == "ddp" and trainer_cfg.max_epochs >= 1
