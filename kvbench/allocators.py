"""Every KV-cache allocator of ``conf/allocator/``, by name and as a class (the same configs as ``allocator=<name>``).

    kvbench.allocators.names()                  # the options: [..., 'pyramid', ...]
    kvbench.allocators.Pyramid                     # a class, by class name; kvbench.allocators.get("pyramid") by option
    kvbench.allocators.params("pyramid")        # its parameters and defaults, as allocator=pyramid composes them
    kvbench.allocators.build("pyramid", ...)    # an instance, parameters validated as the CLI does
    print(kvbench.allocators.describe("pyramid"))  # its docstring + the yaml, every parameter with its comment

Importing this module imports no torch; a class is imported when it is first asked for.
"""

from __future__ import annotations

from kvbench.registry import public_module

REGISTRY = public_module("allocator", globals())
