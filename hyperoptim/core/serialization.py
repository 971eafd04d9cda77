r"""state_dict, load_state_dict and pickling: everything a resumed run needs.

A part of :class:`~hyperoptim.core.base.HyperOptimizer` (docs/design.md §7), kept in its own module;
it is not meant to be used on its own.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .ledger import GradLedger
from .migrate import from_torch
from .options import fixed_values, renamed_group
from .state_checks import check_hyper_state, check_param_state
from .warn import warn

HISTORY_LIMIT = 10_000
"""The default of :attr:`HyperOptimizer.history_limit`: entries kept per name and param group."""

# Group keys that a state dict saved before they existed may lack (filled from the defaults).
_OPTIONAL_KEYS = frozenset({"maximize", "dampening", "nesterov", "foreach", "differentiable",
                           "fused", "param_names", "hyper_step", "outer_step"})

# Optional keys whose absence means what the package did before they existed, whatever this
# optimizer's value: a checkpoint saved before hyper-step policies (HD, MARTHE) or FDS's
# outer_step took the additive step.
_LEGACY_VALUES = {"hyper_step": "additive", "outer_step": "additive"}

EXTRA_STATE_KEY = "hyperoptim_extra_state"
"""The key of ``state_dict()["param_groups"][0]`` that repeats, as one opaque ``bytes`` value,
what a resumed run needs beyond torch's ``state`` and ``param_groups``: torch.distributed.checkpoint
(``get_optimizer_state_dict``) keeps only those two, and one opaque value survives its
target-driven load whole (README, "Distributed training")."""

_EXTRA_KEYS = ("optimizer_class", "history", "history_limit", "hyper_state")


def _to_device(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj


def _history_fits(history: Any, n_groups: int) -> bool:
    """``history`` is absent or one dict of lists per param group."""
    return history is None or (isinstance(history, list) and len(history) == n_groups
                               and all(isinstance(h, dict) and all(isinstance(v, list)
                                                                   for v in h.values())
                                       for h in history))


def repeat_extras(state_dict: dict[str, Any]) -> None:
    """Put every top-level key of ``state_dict`` but torch's two (``state``, ``param_groups``)
    into ``param_groups[0][EXTRA_STATE_KEY]``, serialised as ``torch.save`` writes them; for
    a subclass that adds its own keys after :meth:`_Serialization.state_dict`."""
    if not state_dict.get("param_groups"):
        return
    buffer = io.BytesIO()
    torch.save({k: v for k, v in state_dict.items() if k not in ("state", "param_groups")},
               buffer)
    state_dict["param_groups"][0][EXTRA_STATE_KEY] = buffer.getvalue()


def _unpack_extras(name: str, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with :data:`EXTRA_STATE_KEY` taken out of its param groups and its content
    put back at the top level, where the top level lacks it (a torch.distributed.checkpoint
    round trip); the caller's dict is not modified."""
    groups = state_dict.get("param_groups")
    if not (isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups)):
        return state_dict  # the usual checks report it
    blob = groups[0].get(EXTRA_STATE_KEY)
    groups = [{k: v for k, v in g.items() if k != EXTRA_STATE_KEY} for g in groups]
    state_dict = {**state_dict, "param_groups": groups}
    if blob is None:
        return state_dict
    return {**_read_extras(name, blob), **state_dict}  # what the top level says wins


def _read_extras(name: str, blob: Any) -> dict[str, Any]:
    """What :func:`repeat_extras` wrote; ``ValueError`` for anything else."""
    try:
        extras = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        why = "" if isinstance(extras, dict) else f"a {type(extras).__name__}"
    except Exception as err:  # any unreadable value is the same error for the user
        why = str(err)
    if why:
        raise ValueError(f"{name}.load_state_dict: param_groups[0][{EXTRA_STATE_KEY!r}] is not "
                         f"what {name}.state_dict() wrote ({why})")
    return extras


class _Serialization:
    """state_dict, load_state_dict and pickling: everything a resumed run needs."""

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """Torch's state dict plus the class name, ``history`` and ``hyper_state``.

        ``history`` is copied list by list (its entries are immutable floats or lists never
        changed after they are recorded), not deep-copied, so the call stays cheap; its length is
        bounded by :attr:`history_limit`. State-dict post-hooks see the whole dict.

        ``param_groups[0]`` repeats the keys torch does not have, as they stand after the
        hooks, in one ``bytes`` value under :data:`EXTRA_STATE_KEY`, so that they survive
        ``torch.distributed.checkpoint`` (which keeps only ``state`` and ``param_groups``);
        :meth:`load_state_dict` reads them from there where the top level lacks them.
        """
        hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = hooks
        sd["optimizer_class"] = type(self).__name__
        sd["history"] = [{k: list(v) for k, v in h.items()} for h in self.history]
        sd["history_limit"] = self.history_limit
        sd["hyper_state"] = copy.deepcopy(self.hyper_state)
        for hook in hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        repeat_extras(sd)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved; a resumed run continues exactly.

        A plain ``torch.optim`` state dict of the matching kind (SGD for the SGD-based classes,
        Adam/AdamW for the Adam family) migrates: torch's values and per-parameter state are
        kept, the hyper state starts fresh, and ``history[i]["note"]`` says so
        (:mod:`hyperoptim.core.migrate`).

        Refused with ``ValueError`` naming the offending key before anything changes
        (:meth:`_check_loadable`): a state dict saved by another optimizer class, param groups
        that lack this class's options or hold invalid values, per-parameter state of the wrong
        shape or dtype or with NaN/inf, a malformed ``history`` or ``hyper_state``. Group keys
        that older state dicts may lack (``maximize``, ``dampening``, ``nesterov``, torch's
        switches) take this optimizer's values. A load that fails anyway leaves the optimizer
        exactly as it was. Load pre-hooks see, and post-hooks run after, the whole state
        (history included).
        """
        state_dict = dict(state_dict)
        pre, post = (self._optimizer_load_state_dict_pre_hooks,
                     self._optimizer_load_state_dict_post_hooks)
        for hook in pre.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        state_dict = self._with_extras(state_dict)
        state_dict = from_torch(self, state_dict)  # a torch.optim checkpoint: migrate it
        state_dict = self._check_loadable(state_dict)
        with self._all_or_nothing():
            self._load_checked(state_dict, pre, post)
        for hook in post.values():
            hook(self)

    def _with_extras(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The top-level keys back from :data:`EXTRA_STATE_KEY`; a ``HyperoptimWarning`` for a
        state dict of this class that lost them in torch.distributed.checkpoint (nothing left to
        restore them from). A numbered state dict without them loads as before (a torch.optim
        checkpoint given this class's options migrates)."""
        name = type(self).__name__
        state_dict = _unpack_extras(name, state_dict)
        if any(k in state_dict for k in _EXTRA_KEYS) or not self._lost_in_dcp(state_dict):
            return state_dict
        warn(f"{name}.load_state_dict: the state dict has {name}'s param groups but not its "
             "history and hyper_state (torch.distributed.checkpoint with "
             "flatten_optimizer_state_dict=True drops them, as did DCP checkpoints written before "
             "hyperoptim repeated them in param_groups): the learned values in param_groups and "
             "the per-parameter state load, history and hyper_state keep this optimizer's "
             "current values. README, 'Distributed training'.")
        return {**state_dict, "optimizer_class": name}  # load as it is, not as torch's

    def _lost_in_dcp(self, state_dict: dict[str, Any]) -> bool:
        """Did ``state_dict`` come through torch.distributed.checkpoint (its parameters are
        named, not numbered) with every option of this class in every group (a torch.optim
        state dict lacks the hyperparameters' own)?"""
        groups = state_dict.get("param_groups")
        own = [k for k in self.defaults if k not in _OPTIONAL_KEYS]
        return (isinstance(groups, list) and len(groups) == len(self.param_groups)
                and all(isinstance(saved, dict) and all(k in saved for k in own)
                        for saved in groups)
                and any(isinstance(k, str) for saved in groups for k in saved.get("params", ())))

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """On an exception, put every attribute back as it was (then re-raise): torch's load
        rebinds ``state`` and ``param_groups`` to new objects, so the old ones are intact."""
        saved = dict(self.__dict__)
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    def _load_checked(self, state_dict: dict[str, Any], pre: Any, post: Any) -> None:
        history = state_dict.pop("history", None)
        hyper_state = state_dict.pop("hyper_state", None)
        limit = state_dict.pop("history_limit", self.history_limit)
        state_dict.pop("optimizer_class", None)
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        if history is not None:
            self.history = [{k: list(v) for k, v in h.items()} for h in history]
        self._fixed_options = [fixed_values(self, group) for group in self.param_groups]
        self.history_limit = limit
        if hyper_state is not None:
            device = next((p.device for g in self.param_groups for p in g["params"]), None)
            self.hyper_state = _to_device(copy.deepcopy(hyper_state), device)
        self._watch = {}

    def _check_loadable(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """ValueError unless ``state_dict`` fits this optimizer (checked before any change):
        the class, the param groups (every option, :mod:`hyperoptim.core.options`), every
        parameter's state (shapes, dtypes, finiteness), ``history`` and ``hyper_state``.

        Returns the state dict to load: group keys a state dict saved before they existed may
        lack (:data:`_OPTIONAL_KEYS`) filled from this optimizer's groups; the caller's dict is
        not modified."""
        name = type(self).__name__
        self._check_envelope(name, state_dict)
        # A checkpoint saved under the old names of renamed options loads under the new ones.
        saved_groups = [renamed_group(name, g, self._renamed_options, where=" in a checkpoint")
                        for g in state_dict["param_groups"]]
        groups = [{**{k: v for k, v in group.items() if k in _OPTIONAL_KEYS and k != "params"},
                   **{k: v for k, v in _LEGACY_VALUES.items() if k in group},
                   **saved_group}
                  for saved_group, group in zip(saved_groups, self.param_groups)]
        state_dict = {**state_dict, "param_groups": groups}
        for i, (saved_group, group) in enumerate(zip(groups, self.param_groups)):
            self._check_saved_group(name, i, saved_group, group)
        self._check_saved_state(name, state_dict["state"], groups)
        if not _history_fits(state_dict.get("history"), len(groups)):
            raise ValueError(f"{name}.load_state_dict: history does not have one dict of lists "
                             "per param group")
        if state_dict.get("hyper_state") is not None:
            check_hyper_state(self, state_dict["hyper_state"], len(groups))
        return state_dict

    def _check_envelope(self, name: str, state_dict: dict[str, Any]) -> None:
        """The state dict's class and the number and kind of its param groups."""
        saved = state_dict.get("optimizer_class")
        if saved is not None and saved != name:
            raise ValueError(f"{name}.load_state_dict: the state dict was saved by {saved}, not "
                             f"{name}; load it into a {saved}.")
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
            raise ValueError(f"{name}.load_state_dict: not an optimizer state dict (no "
                             "'state'/'param_groups')")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state dict has {len(groups)} param "
                             f"groups, this optimizer {len(self.param_groups)}")
        if not all(isinstance(g, dict) for g in groups):
            raise ValueError(f"{name}.load_state_dict: a param group of the state dict is not a "
                             "dict")

    def _check_saved_state(self, name: str, state: dict[Any, Any],
                           groups: list[dict[str, Any]]) -> None:
        """Every parameter's saved state, against the parameter its key maps to."""
        params = {k: p for g, group in zip(groups, self.param_groups)
                  for k, p in zip(g["params"], group["params"])}
        for key, entry in state.items():
            if key not in params:
                raise ValueError(f"{name}.load_state_dict: state[{key!r}] belongs to no parameter "
                                 "of the state dict's param groups")
            check_param_state(name, key, entry, params[key])

    def _check_saved_group(self, name: str, i: int, saved_group: dict[str, Any],
                           group: dict[str, Any]) -> None:
        """Param group ``i`` of the state dict (optional keys filled) against this optimizer's."""
        missing = sorted(k for k in group if k not in saved_group and k not in _OPTIONAL_KEYS)
        if missing:
            raise ValueError(f"{name}.load_state_dict: param group {i} of the state dict lacks "
                             f"{missing}: it was not saved by a {name}")
        if len(saved_group.get("params", ())) != len(group["params"]):
            raise ValueError(f"{name}.load_state_dict: param group {i} has "
                             f"{len(saved_group.get('params', ()))} parameters in the state "
                             f"dict, {len(group['params'])} here")
        try:
            self._check_group({k: v for k, v in saved_group.items() if k != "params"})
        except ValueError as err:
            raise ValueError(f"{name}.load_state_dict: param_groups[{i}]: {err}") from None

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults/state/param_groups; ours must survive deepcopy too.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also calls this with state/param_groups only: keep what we have.
        missing = {
            "history": [{} for _ in state.get("param_groups", [])],
            "history_limit": HISTORY_LIMIT,
            "hyper_state": {},
            "val_closure": None,
            "train_closure": None,
            "hvp": "auto",
            "_hvp_route": None,
            "_fd_rough": False,
            "_flipped": [],
            "_grad_ledger": GradLedger(),
            "_watch": {},
            "_val_checked": False,
            "_ddp_synced": frozenset(),
        }
        for key, value in missing.items():
            if key not in state and key not in self.__dict__:
                state[key] = value
        super().__setstate__(state)
        self.param_groups[:] = [renamed_group(type(self).__name__, g, self._renamed_options,
                                              where=" in a pickled optimizer")
                                for g in self.param_groups]
