"""The one place where names from config become objects.

``conf/strategy/<name>.yaml`` is the registry of strategies: ``disttrain.setup(strategy="ddp")``
and the Hydra app both resolve a name through it, so a user's own strategy (a YAML file with a
``_target_``) plugs in with no code change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, cast

from omegaconf import DictConfig, OmegaConf

from disttrain.errors import ConfigError
from disttrain.tree import to_plain  # noqa: F401  (re-exported: configs and user code import it here)

CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped in the package (the checkout's conf/ links here)


def available(group: str) -> list[str]:
    """Names of the configs in ``conf/<group>/``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def group_config(group: str, name: str) -> DictConfig:
    """Load ``conf/<group>/<name>.yaml`` or raise ConfigError listing the available names."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{group}={name!r} is not a known {group}: available are {available(group)}")
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    return cfg


def instantiate(cfg: Mapping[str, Any] | DictConfig, what: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with an error that names the config key when it fails."""
    from hydra.utils import instantiate as _instantiate

    target = cfg.get("_target_") if cfg is not None else None
    if not target:
        raise ConfigError(
            f"{what} has no _target_: set {what}._target_ to the import path of a class or function "
            f"(e.g. {what}._target_=my_package.MyThing)"
        )
    try:
        return _instantiate(cfg, **kwargs)
    except Exception as exc:  # Hydra wraps import and call errors in InstantiationException
        raise ConfigError(f"could not instantiate {what} (_target_={target}): {exc}") from exc


def build_strategy(strategy: Any, **options: Any):
    """A Strategy from a name (``"ddp"``), a config mapping with ``_target_``, or an instance."""
    from disttrain.strategies.base import Strategy

    if isinstance(strategy, Strategy):
        if options:
            raise ConfigError(f"options {sorted(options)} given with an already built strategy {strategy.name!r}")
        return strategy
    if isinstance(strategy, str):
        cfg = group_config("strategy", strategy)
    else:
        cfg = OmegaConf.create(dict(strategy) if not isinstance(strategy, DictConfig) else strategy)
    if options:
        cfg = cast(DictConfig, OmegaConf.merge(cfg, options))
    target = cfg.get("_target_")
    if target:
        from hydra._internal.utils import _locate

        from disttrain import schema

        try:
            cls = _locate(str(target))
        except Exception as exc:
            raise ConfigError(f"strategy._target_={target!r} cannot be imported ({str(exc).splitlines()[0][:200]})") from exc
        plain = cast(dict, OmegaConf.to_container(cfg, resolve=True))
        values = {str(k): v for k, v in plain.items() if not str(k).startswith("_")}
        schema.check_call(cls, values, "strategy")
    obj = instantiate(cfg, "strategy")
    if not isinstance(obj, Strategy):
        raise ConfigError(f"strategy._target_={cfg.get('_target_')} built a {type(obj).__name__}, not a disttrain Strategy")
    return obj
