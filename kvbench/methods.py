"""Every KV-cache method of ``conf/method/``, by name and as a class (the same configs as ``method=<name>``).

    kvbench.methods.names()                  # the options: [..., 'snapkv', ...]
    kvbench.methods.SnapKV                     # a class, by class name; kvbench.methods.get("snapkv") by option
    kvbench.methods.params("snapkv")        # its parameters and defaults, as method=snapkv composes them
    kvbench.methods.build("snapkv", ...)    # an instance, parameters validated as the CLI does
    print(kvbench.methods.describe("snapkv"))  # its docstring + the yaml, every parameter with its comment

Importing this module imports no torch; a class is imported when it is first asked for.
"""

from __future__ import annotations

from kvbench.registry import public_module

REGISTRY = public_module("method", globals())
