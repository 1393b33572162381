"""A CPU-only check that every model input was put on the model's device by the code under test.

On a CPU machine every tensor is already on the model's device, so "forgot `.to(device)`" bugs
(which crash on a GPU) pass unnoticed. `DeviceGuard` makes them visible: inside it, a tensor
counts as *on the model's device* only when the code moved it there (`.to(device)`, `.cuda()`),
created it with an explicit `device=` (as `torch.arange(n, device=ids.device)` does), or computed
it from such tensors. A pre-hook on the Hugging Face model rejects any tensor input that is not,
i.e. one built on the host (`torch.tensor(...)`, `torch.full(...)`) and passed on as is.

Example:
    >>> with DeviceGuard(model.hf_model) as guard:  # doctest: +SKIP
    ...     code_under_test(model)
    >>> guard.n_checked > 0  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_TAG = "_on_model_device"
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _names_a_device(func: Any, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("device") is not None:
        return True
    if func in _MOVES:
        return func is torch.Tensor.cuda or any(isinstance(a, (torch.device, str)) for a in args[1:])
    return False


class DeviceGuard(TorchFunctionMode):
    """Tag tensors placed on the model's device; raise when the model receives an untagged tensor.

    Args:
        model: The Hugging Face module whose forward inputs are checked (a pre-hook on it).

    Attributes:
        n_checked: Forward calls whose inputs were checked.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.n_checked = 0
        self._handle: Any = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        placed = _names_a_device(func, args, kwargs) or any(
            getattr(t, _TAG, False) for t in _tensors((args, kwargs))
        )
        if placed:
            for t in _tensors(out):
                try:
                    setattr(t, _TAG, True)
                except (AttributeError, RuntimeError):  # some internal tensors refuse attributes
                    pass
        return out

    def _check(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.n_checked += 1
        named = [(f"args[{i}]", a) for i, a in enumerate(args)] + list(kwargs.items())
        bad = [name for name, value in named for t in _tensors(value) if not getattr(t, _TAG, False)]
        if bad:
            raise AssertionError(
                f"model input(s) {bad} were created on the host and never moved to the model's device "
                "(add .to(device) where they are built); this crashes on a GPU."
            )

    def __enter__(self) -> DeviceGuard:
        self._handle = self.model.register_forward_pre_hook(self._check, with_kwargs=True)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._handle.remove()
