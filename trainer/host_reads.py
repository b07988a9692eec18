"""Counting where onion's own code reads tensor values into Python.

On a GPU each such read (``.item()``, ``int(t)``, ``.tolist()``, a blocking copy to the CPU) makes
the host wait until the device has finished everything queued so far. The training step must
make none; this counter shows it on any device, CPU included, where there is no device to wait
for but the reads are the same. Reads made inside torch itself are not counted (on CUDA,
``torch.cuda.set_sync_debug_mode`` sees those).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

from torch.overrides import TorchFunctionMode

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN_CODE = tuple(os.path.join(PROJECT, package) + os.sep for package in ("trainer", "shards", "pipeline"))
READS = frozenset({"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu"})


class HostReads(TorchFunctionMode):
    """While active, records each read of a tensor into Python made from onion's code, as "name at file:line"."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):  # noqa: ANN204
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        blocking_copy = name == "to" and not kwargs.get("non_blocking", False) and "cpu" in map(str, args[1:])
        if name in READS or blocking_copy:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(OWN_CODE):
                where = os.path.relpath(caller.f_code.co_filename, PROJECT)
                self.reads.append(f"{name} at {where}:{caller.f_lineno}")
        return func(*args, **kwargs)
