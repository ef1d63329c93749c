"""Every KV-cache method of ``conf/method/``, by name and as a class (the same configs as ``method=<name>``).

    kvbench.methods.names()                  # the options: [..., 'snapkv', ...]
    kvbench.methods.SnapKV                     # a class, by class name; kvbench.methods.get("snapkv") by option
    kvbench.methods.params("snapkv")        # its parameters and defaults, as method=snapkv composes them
    kvbench.methods.build("snapkv", ...)    # an instance, parameters validated as the CLI does
    print(kvbench.methods.describe("snapkv"))  # its docstring + the yaml, every parameter with its comment

Importing this module imports no torch; a class is imported when it is first asked for.
"""

from __future__ import annotations

from typing import Any

from kvbench.registry import Registry

REGISTRY = Registry("method")
names = REGISTRY.names
get = REGISTRY.get
params = REGISTRY.params
build = REGISTRY.build
describe = REGISTRY.describe


def __getattr__(name: str) -> Any:
    return REGISTRY.cls(name)


def __dir__() -> list[str]:
    return sorted([*globals(), *REGISTRY.class_names()])
