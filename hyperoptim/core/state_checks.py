"""Checks of a saved state before ``load_state_dict`` changes anything: each parameter's state,
and the ``hyper_state`` each method keeps (docs/design.md §5). Split from :mod:`.options`, which
checks the options."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..hyperstep import check_stall
from .checks import is_real
from .options import components

__all__ = ["check_hyper_state", "check_param_state"]


def _shape_fits(value: Tensor, param: Tensor) -> bool:
    """A 0-dim value, the parameter's shape, one broadcast along it (per-unit sharing), or
    columns of it (a tangent: ``(k, *param.shape)``)."""
    if value.dim() == 0:
        return True
    if value.dim() == param.dim() + 1:
        return value.shape[1:] == param.shape
    return value.dim() == param.dim() and all(a in (b, 1) for a, b in zip(value.shape, param.shape))


def check_param_state(owner: str, key: Any, state: Any, param: Tensor) -> None:
    """One parameter's saved state: a dict of tensors of a fitting shape, floating and finite
    (``"step"`` may hold any real dtype), or numbers / None."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{owner}.load_state_dict: state[{key!r}] is not a dict")
    for name, value in state.items():
        where = f"{owner}.load_state_dict: state[{key!r}][{name!r}]"
        if isinstance(value, Tensor):
            if value.is_complex() or value.dtype == torch.bool or (
                    not value.is_floating_point() and name != "step"):
                raise ValueError(f"{where} has dtype {value.dtype}; expected a floating dtype")
            if not _shape_fits(value, param):
                raise ValueError(f"{where} has shape {tuple(value.shape)}, which does not fit the "
                                 f"parameter's shape {tuple(param.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{where} holds non-finite values (NaN or inf)")
        elif value is not None and not (is_real(value) or isinstance(value, bool)):
            raise ValueError(f"{where} is {value!r}; expected a tensor or a number")


def _finite_numbers(values: Any) -> bool:
    if isinstance(values, Mapping):
        return all(_finite_numbers(v) for v in values.values())
    if isinstance(values, (list, tuple)):
        return all(_finite_numbers(v) for v in values)
    if isinstance(values, Tensor):
        return not values.is_floating_point() or bool(torch.isfinite(values).all())
    return is_real(values) or values is None or isinstance(values, bool)


def _counter(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _ift_hyper_state(hyper_state: Mapping[str, Any], n_groups: int
                     ) -> dict[str, Callable[[Any], bool]]:
    def per_group(v: Any) -> bool:
        return isinstance(v, list) and len(v) == n_groups and all(isinstance(g, Mapping) for g in v)
    return dict(transformed=per_group, published=per_group, since_update=_counter,
                steps=_counter)


def _fds_hyper_state(hyper_state: Mapping[str, Any], n_groups: int
                     ) -> dict[str, Callable[[Any], bool]]:
    required = dict(step=_counter, episode=_counter, outer=lambda v: isinstance(v, Mapping))
    if "episode_skipped" in hyper_state:  # absent from state dicts saved before it existed
        required["episode_skipped"] = _counter
    return required


def _marthe_hyper_state(hyper_state: Mapping[str, Any], n_groups: int
                        ) -> dict[str, Callable[[Any], bool]]:
    stall = _stall_watch(hyper_state)
    if "groups" not in hyper_state:
        return stall
    return dict(stall, groups=lambda v: isinstance(v, list) and len(v) <= n_groups and all(
        isinstance(g, Mapping) and {"mu", "count", "beta", "lr_beta_grad"} <= set(g) for g in v))


def _stall_watch(hyper_state: Mapping[str, Any]) -> dict[str, Callable[[Any], bool]]:
    """The stall watch of a momentum learned while the run is stalled, HD's and MARTHE's (absent
    before its first step, and from state dicts saved before it existed)."""
    return {"stall": check_stall} if "stall" in hyper_state else {}


def _hd_hyper_state(hyper_state: Mapping[str, Any], n_groups: int
                    ) -> dict[str, Callable[[Any], bool]]:
    return _stall_watch(hyper_state)


# Method -> the keys its hyper_state must hold and a check of each; the first method of the
# class's components found here decides.
_HYPER_STATE: dict[str, Callable[[Mapping[str, Any], int], dict[str, Callable[[Any], bool]]]] = {
    "ift": _ift_hyper_state,
    "fds": _fds_hyper_state,
    "marthe": _marthe_hyper_state,
    "hd": _hd_hyper_state,
}


def check_hyper_state(owner: Any, hyper_state: Any, n_groups: int) -> None:
    """The saved ``hyper_state``: a dict whose learned numbers are finite, with the structure the
    class's method keeps (IFT: ``transformed``/``published`` per group and its counters; MARTHE:
    one entry per group; FDS: its counters)."""
    name = type(owner).__name__
    if not isinstance(hyper_state, Mapping):
        raise ValueError(f"{name}.load_state_dict: invalid hyper_state (not a dict)")
    parts = components(owner) or ()
    method = next((m for m in _HYPER_STATE if m in parts), None)
    required = _HYPER_STATE[method](hyper_state, n_groups) if method is not None else {}
    for key, ok in required.items():
        if key not in hyper_state:
            raise ValueError(f"{name}.load_state_dict: hyper_state lacks {key!r}")
        if not ok(hyper_state[key]):
            raise ValueError(f"{name}.load_state_dict: hyper_state[{key!r}] is malformed: "
                             f"{hyper_state[key]!r}")
    for key, value in hyper_state.items():
        if not _finite_numbers(value):
            raise ValueError(f"{name}.load_state_dict: hyper_state[{key!r}] holds a non-finite "
                             "or non-numeric value")
