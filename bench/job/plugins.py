"""Plugins by `_target_`: a method, a task, a judge, a logger, a model source or a dataset
is whatever importable class (or function) its config node names. `build` instantiates
one and checks its contract; a target that cannot be found says why."""

from __future__ import annotations

import importlib
import re
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from bench.errors import ConfigError, FeatbenchError, error_line

HYDRA_HINT = re.compile(r",? ?set env var HYDRA_FULL_ERROR=1 to see chained exception\.?")


def plugin_name(obj: object) -> str:
    """A plugin's `name` class attribute, else its class name in lower case."""
    return getattr(type(obj), "name", None) or type(obj).__name__.lower()


def build(node: DictConfig, kind: str, base: type) -> Any:
    """Instantiate a `_target_` node and check it implements the contract. A target that
    cannot be found says whether its module or the attribute is missing."""
    target = node.get("_target_")
    if isinstance(target, str):
        locate(target, kind)
    try:
        obj = hydra.utils.instantiate(node, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, FeatbenchError):  # the plugin's own clear message
            raise err.__cause__ from None
        message = HYDRA_HINT.sub("", str(err))  # the hint shows nothing more here
        raise ConfigError(f"{kind} {target!r} could not be built: {message}") from None
    if not isinstance(obj, base):
        raise ConfigError(
            f"{kind} {node.get('_target_')!r} is not a {base.__module__}.{base.__name__} subclass"
        )
    return obj


def locate(target: str, kind: str) -> None:
    """Raise ConfigError unless `target` (`module.attribute`) can be found, saying whether
    the module is missing, failed to import, or lacks the attribute."""
    parts = target.split(".")
    module, found = None, 0
    for i in range(len(parts) - 1, 0, -1):  # the longest importable prefix
        name = ".".join(parts[:i])
        try:
            module, found = importlib.import_module(name), i
            break
        except ModuleNotFoundError as err:
            if err.name is not None and not name.startswith(err.name):
                raise ConfigError(
                    f"{kind} {target!r} could not be built: importing module "
                    f"{name!r} failed: {error_line(err)}"
                ) from None
        except Exception as err:  # the module exists but its code fails on import
            raise ConfigError(
                f"{kind} {target!r} could not be built: importing module "
                f"{name!r} failed: {error_line(err)}"
            ) from None
    if module is None:
        raise ConfigError(
            f"{kind} {target!r} could not be built: module {parts[0]!r} not found. A plugin "
            "outside featbench must be importable: installed, or its folder on PYTHONPATH "
            "(hydra.searchpath adds configs, not code)"
        )
    value = module
    for attribute in parts[found:]:
        if not hasattr(value, attribute):
            raise ConfigError(
                f"{kind} {target!r} could not be built: module "
                f"{'.'.join(parts[:found])!r} has no attribute {attribute!r}"
            )
        value = getattr(value, attribute)
