"""torch.compile for the two-tower net: each tower's stretches between exchanges, compiled one by one.

Each stretch runs on one device, so each graph does. Compiling fuses LRN's ~20 elementwise passes, which
are memory-bound on a GPU, into a few kernels.
"""

from __future__ import annotations

import types

import torch

from .network import AlexNet, Tower


def compile_towers(model: AlexNet) -> None:
    """Replace each tower's stretches (``Tower.STRETCHES``) with compiled ones, each from its own code object.

    Dynamo keeps its graphs per code object, at most ``recompile_limit`` (8) of them.
    Two towers share each method's code, and each stretch needs a graph per mode and per batch size.
    Shared, they overflowed the limit, and every call past the 8th graph ran uncompiled.
    """
    for number, tower in enumerate(model.towers):
        for stretch in Tower.STRETCHES:
            code = _own_code(getattr(Tower, stretch), f"tower{number}_{stretch}")
            setattr(tower, stretch, torch.compile(code.__get__(tower)))


def _own_code(function, name: str):
    """``function`` with a code object of its own (named ``name``), so that dynamo caches its graphs apart."""
    code = function.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)
