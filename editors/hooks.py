"""Forward hooks, only through context managers that always remove them."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn


@contextmanager
def forward_hook(module: nn.Module, fn: Callable) -> Iterator[None]:
    """Register `fn` as a forward hook on `module` for the duration of the block."""
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def forward_pre_hook(module: nn.Module, fn: Callable) -> Iterator[None]:
    """Register `fn` as a forward pre-hook on `module` for the duration of the block."""
    handle = module.register_forward_pre_hook(fn)
    try:
        yield
    finally:
        handle.remove()


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass early (nothing above is needed)."""


@contextmanager
def capture_input(module: nn.Module, store: list, stop: bool = False) -> Iterator[None]:
    """Append each input of `module` to `store`; with stop=True, abort the forward after it."""

    def hook(_mod, args):
        store.append(args[0].detach())
        if stop:
            raise StopForward

    with forward_pre_hook(module, hook):
        yield
