"""Methods and allocators by name, from the same config tree as the CLI (``conf/method``, ``conf/allocator``).

``Registry("method")`` backs :mod:`kvbench.methods` and ``Registry("allocator")`` :mod:`kvbench.allocators`: the
names are the yaml stems, the classes their ``_target_``, the defaults what Hydra composes for ``method=<name>``
(a method's yaml may inherit another's fields and pick its allocator, as ``adakv`` does), and an instance is built
with ``kvbench.runner.build``'s rule, so defaults, validation and messages are the CLI's. ``compose_config`` is the
one composition of ``conf/config.yaml`` with overrides for the Python API. No torch is imported here until a class
is asked for.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from kvbench.cli import CONF_DIR, GROUPS, unknown_option
from kvbench.errors import UsageError
from kvbench.validate import check_config

RESERVED = ("_target_", "name", "defaults")  # config keys that are not a parameter of the class


def compose_config(overrides: list[str]) -> DictConfig:
    """``conf/config.yaml`` composed with Hydra ``overrides`` (``method=snapkv``, ``budget=0.2`` ...) and checked
    like a CLI run (:func:`kvbench.validate.check_config`); a bad option name is one UsageError listing the valid
    ones."""
    if message := unknown_option(overrides, CONF_DIR, GROUPS):
        raise UsageError(message)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose("config", overrides=overrides)
        except Exception as err:  # Hydra's errors name the bad key or value
            raise UsageError(f"invalid kvbench configuration {overrides}: {err}") from err
    check_config(cfg)
    return cfg


def set_params(cfg: DictConfig, group: str, params: dict[str, Any]) -> None:
    """Set ``cfg[group]``'s parameters from Python values; an unknown one is one UsageError listing the valid."""
    node = cfg[group]
    valid = [k for k in node if k not in RESERVED]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise UsageError(f"{group} {node.name} has no parameter {', '.join(map(repr, unknown))}; its parameters: "
                         f"{', '.join(valid) or '(none)'}")
    for key, value in params.items():
        OmegaConf.update(cfg, f"{group}.{key}", value, merge=False)


class Registry:
    """The options of one config group (``method`` or ``allocator``): names, classes, defaults, instances."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.folder = CONF_DIR / group

    def names(self) -> list[str]:
        """Every option, e.g. ``['adakv', 'cake', ...]`` for methods."""
        return sorted(p.stem for p in self.folder.glob("*.yaml"))

    def check(self, name: str) -> None:
        if name not in self.names():
            raise UsageError(f"unknown {self.group} {name!r}; available: {', '.join(self.names())}")

    def config(self, name: str, **params: Any) -> DictConfig:
        """The composed node of ``<group>=<name>`` with ``params`` set (what ``python -m kvbench`` builds)."""
        self.check(name)
        cfg = compose_config([f"{self.group}={name}"])
        set_params(cfg, self.group, params)
        return cfg[self.group]

    def params(self, name: str) -> dict[str, Any]:
        """The parameters of ``name`` with their defaults."""
        node = OmegaConf.to_container(self.config(name), resolve=True)
        return {k: v for k, v in node.items() if k not in RESERVED}

    def build(self, name: str, **params: Any) -> Any:
        """An instance of ``name`` with ``params`` over its defaults (validated as the CLI validates them)."""
        from kvbench.runner import build  # torch and the engine: only when an instance is asked for

        return build(self.config(name, **params), self.group)

    def get(self, name: str) -> type:
        """The class of option ``name`` (several options may share one class with other defaults)."""
        self.check(name)
        return get_class(self.targets()[name])

    def describe(self, name: str) -> str:
        """The class's docstring and the option's yaml (its parameters, defaults and their comments)."""
        cls = self.get(name)
        return (f"{self.group} {name}: {cls.__module__}.{cls.__qualname__}\n\n{cls.__doc__ or ''}\n\n"
                f"conf/{self.group}/{name}.yaml:\n{(self.folder / f'{name}.yaml').read_text()}")

    def targets(self) -> dict[str, str]:
        """``{option: dotted class path}`` from every yaml's own ``_target_``."""
        return _targets(str(self.folder))

    def class_names(self) -> dict[str, str]:
        """``{class name: dotted path}`` of every class an option names (``SnapKV``, ``HeadAdaptive`` ...)."""
        return {t.rsplit(".", 1)[1]: t for t in self.targets().values()}

    def cls(self, attr: str) -> type:
        """A class by its name, for module attribute access; AttributeError for any other name."""
        target = self.class_names().get(attr)
        if target is None:
            raise AttributeError(f"no {self.group} class {attr!r}; classes: {', '.join(sorted(self.class_names()))}")
        return get_class(target)


@cache
def _targets(folder: str) -> dict[str, str]:
    return {p.stem: _target(Path(folder), p.stem) for p in sorted(Path(folder).glob("*.yaml"))}


def _target(folder: Path, name: str) -> str:
    """An option's ``_target_``, its own or that of the option it extends (``defaults: [cake]``), as Hydra would
    compose it (the composed node is what ``build`` uses; this only names the class without composing)."""
    node = OmegaConf.load(folder / f"{name}.yaml")
    node = node.get(folder.name, node)  # a ``# @package _global_`` option nests its own node under the group key
    if "_target_" in node:
        return str(node["_target_"])
    parents = [d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    if not parents:
        raise UsageError(f"conf/{folder.name}/{name}.yaml names no _target_ and extends no other option")
    return _target(folder, parents[0])


def public_module(group: str, namespace: dict[str, Any]) -> Registry:
    """Fill a public module's namespace (``kvbench.methods``, ``kvbench.allocators``) with the group's registry:
    ``names``, ``get``, ``params``, ``build``, ``describe``, and every class by its name (module ``__getattr__``,
    imported when first asked for)."""
    reg = Registry(group)
    namespace.update(REGISTRY=reg, names=reg.names, get=reg.get, params=reg.params, build=reg.build,
                     describe=reg.describe, __getattr__=reg.cls,
                     __dir__=lambda: sorted([*namespace, *reg.class_names()]))
    return reg
