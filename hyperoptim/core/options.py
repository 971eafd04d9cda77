r"""Every option of every update rule and method, declared once, and the one place they are checked.

An :class:`Option` names a value a user can set (a constructor argument, and for most of them a
key of every param group), its default, what it may be, and which *components* use it. A component
is an update rule (``"sgd"``, ``"adam"``), a method (``"hd"``, ``"marthe"``, ``"ift"``, ``"fds"``),
a method over a rule where the pair restricts something (``"ift-sgd"``, ``"ift-adam"``), or
torch's implementation switches (``"torch"``); each public class is a list of components
(:data:`CLASS_COMPONENTS`), later ones overriding earlier ones where they declare the same name.

The same checks run wherever a value enters:

- the constructor (:func:`check_arguments`, and every group of the defaults),
- a per-group dict and :meth:`~torch.optim.Optimizer.add_param_group` (:func:`check_group`),
- :meth:`~torch.optim.Optimizer.load_state_dict` (:func:`check_group` on every saved group,
  :func:`check_param_state` on every parameter's state, :func:`check_hyper_state`), before anything
  changes,
- values assigned into ``param_groups`` after construction (by the user or a scheduler):
  :func:`validate_groups` at the start of the next ``step()``, before anything is written.

An invalid value raises ``ValueError("Invalid <name> value: <value> (<what it may be>)")``, the
wording of ``torch.optim``. A key of the package's vocabulary that the class does not use (say
``'momentum'`` in a ``HypergradAdam`` group, or ``'amsgrad': True``) is refused by name, never
ignored; keys outside the vocabulary (``'initial_lr'`` from a scheduler, a user's own ``'name'``)
are left alone, as torch does. A 0-dim (or one-element) floating tensor ``lr`` is accepted as
torch accepts it and stored as a Python float (every learned value in ``param_groups`` is one).

The hyper-step vocabulary
-------------------------
One name means "the size of the step the hyperparameters take" in every method, ``hyper_lr``:

=======  ===========================================================  ========================
method   ``hyper_lr`` is                                              old name
=======  ===========================================================  ========================
HD       the hyper-learning rate kappa                                ``hypergrad_lr``
MARTHE   kappa of beta (``adapt_hyper_lr=True``), or the fixed beta   ``hypergrad_lr``
MARTHE   ``adapt_hyper_lr``: whether beta adapts online               ``adapt_hypergrad_lr``
IFT      the hyper optimizer's learning rate                          (always ``hyper_lr``)
FDS      the initial outer step size: one for every schedule, or a    ``step_sizes``
         dict by name
=======  ===========================================================  ========================

:data:`HYPER_STEP_NAMES` records this mapping. ``hypergrad_clip`` (MARTHE: clips the
hypergradient) and ``hz_clip`` (FDS: clips :math:`H Z`) clip different things and keep their names,
as do ``history`` names (``"hypergrad/lr"`` is the hypergradient itself; MARTHE's
``"hypergrad_lr"`` records :math:`\beta_t`, which code that plots it reads). The old names are
accepted for one release with a ``DeprecationWarning`` naming the new one (:func:`renamed_options`,
:func:`renamed_group`, :func:`rename_assigned`): as constructor keywords, as keys of a per-group
dict or :meth:`~torch.optim.Optimizer.add_param_group`, in the param groups of a checkpoint
(renamed on load), and assigned into ``param_groups`` after construction (applied to the new
key). Giving both names is a ``ValueError`` naming both.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..hyperstep import resolve
from .checks import is_real
from .warn import warn

__all__ = [
    "CLASS_COMPONENTS", "HYPER_STEP_NAMES", "OPTIONS", "Option", "check_arguments", "check_group",
    "check_rule_arguments", "coerce_group", "components",
    "fixed_values", "is_number", "options_of", "rename_assigned", "renamed_group",
    "refresh_passed", "renamed_options", "validate_groups",
]

# Every learned value stays within [-LEARNED_LIMIT, LEARNED_LIMIT] (core.base.LEARNED_LIMIT).
_LIMIT = 1e3
_NAMES = ("lr", "momentum", "weight_decay")
# What hypergradient descent learns: the learning rate, and optionally the momentum (SGD's
# ``momentum``, Adam's ``beta1``).
_HD_NAMES = ("lr", "momentum")
# Types whose values cannot change in place (bool and int told apart from float by the type).
_ATOMS = frozenset({bool, int, float, str, type(None)})


@dataclass(frozen=True)
class Option:
    """One option: its name, default, what it may be, and where it is used.

    Attributes:
        name: the constructor argument (and param-group key, if ``in_group``).
        default: the default (the class's signature wins where it differs, e.g. AdamW's
            ``weight_decay``).
        check: ``check(value) -> bool``, True for a valid value.
        expect: what a valid value is, in words (the end of the error message).
        used_by: the components that use it.
        in_group: a key of every param group (False: a constructor argument only).
        fixed: part of the group's structure (the state it holds, the hyper optimizer's groups,
            the tangent columns): a value assigned after the group was added is refused.
    """

    name: str
    default: Any
    check: Callable[[Any], bool]
    expect: str
    used_by: tuple[str, ...]
    in_group: bool = True
    fixed: bool = False


def is_number(v: Any) -> bool:
    """A finite real number, or a one-element floating tensor holding one (torch's tensor lr)."""
    if isinstance(v, Tensor):
        return (v.numel() == 1 and v.is_floating_point() and not v.is_complex()
                and bool(torch.isfinite(v).all()))
    return is_real(v)


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: is_number(v) and float(v) >= low


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _bounded(v: Any) -> bool:
    return is_real(v) and abs(v) <= _LIMIT


def _hd_bounds(v: Any) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in v)
            and not math.isnan(v[0]) and not math.isnan(v[1]) and 0.0 <= v[0] <= v[1])


def _ift_bounds(v: Any) -> bool:
    return _hd_bounds(v) and 0.0 < v[0] and v[1] < math.inf


def _betas(v: Any) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) == 2
            and all(is_number(b) and 0.0 <= float(b) < 1.0 for b in v))


def _tune(empty_ok: bool) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        return (isinstance(v, (tuple, list)) and (empty_ok or len(v) > 0)
                and all(isinstance(n, str) and n in _NAMES for n in v) and len(set(v)) == len(v))
    return check


def _hd_tune(v: Any) -> bool:
    return (isinstance(v, (tuple, list)) and "lr" in v and len(set(v)) == len(v)
            and all(isinstance(n, str) and n in _HD_NAMES for n in v))


def _step_size(v: Any) -> bool:
    return is_real(v) and 0 < v <= _LIMIT


def _step_sizes(v: Any) -> bool:
    return _step_size(v) or isinstance(v, Mapping) and all(k in _NAMES and _step_size(s)
                                                           for k, s in v.items())


def _schedule(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_bounded(x) for x in v)


def _hyper_step(v: Any) -> bool:
    try:
        resolve(v)
    except ValueError:
        return False
    return True


def _zero(v: Any) -> bool:
    return is_number(v) and float(v) == 0.0


_NON_NEGATIVE = "a finite number >= 0"
_TUNE = "a tuple of distinct names from ('lr', 'momentum', 'weight_decay')"

OPTIONS: tuple[Option, ...] = (
    # torch.optim's implementation switches: their defaults are honoured, the rest refused.
    Option("foreach", None, lambda v: v is None or v is False, "None or False: the step runs per "
           "tensor", ("torch",)),
    Option("fused", None, lambda v: v is None or v is False, "None or False: no fused kernel",
           ("torch",)),
    Option("differentiable", False, lambda v: v is False, "False: the step is not differentiable "
           "through its learned hyperparameters", ("torch",)),
    Option("capturable", False, lambda v: v is False, "False: no CUDA-graph capture", ("torch",)),
    # The SGD rule (torch.optim.SGD's arguments and checks).
    Option("lr", 1e-3, _at_least(0.0), _NON_NEGATIVE, ("sgd", "adam")),
    Option("momentum", 0.0, _at_least(0.0), _NON_NEGATIVE, ("sgd",)),
    Option("dampening", 0.0, is_number, "a finite number", ("sgd",)),
    Option("weight_decay", 0.0, _at_least(0.0), _NON_NEGATIVE, ("sgd", "adam")),
    Option("nesterov", False, _flag, "True or False", ("sgd",)),
    Option("maximize", False, _flag, "True or False", ("sgd",)),
    # The Adam/AdamW rule (torch.optim.Adam's).
    Option("betas", (0.9, 0.999), _betas, "two numbers in [0, 1)", ("adam",)),
    Option("eps", 1e-8, _at_least(0.0), _NON_NEGATIVE, ("adam",)),
    Option("amsgrad", False, lambda v: v is False, "amsgrad=True is not supported: the running "
           "maximum has no useful derivative; use amsgrad=False", ("adam",)),
    Option("maximize", False, lambda v: v is False, "not supported: these optimizers minimize; "
           "negate the loss instead", ("adam",)),
    Option("decoupled_weight_decay", False, _flag, "True or False", ("adam",)),
    # Hypergradient descent.
    Option("hyper_lr", 1e-3, _at_least(0.0), _NON_NEGATIVE, ("hd", "marthe")),
    Option("lr_bounds", (0.0, math.inf), _hd_bounds, "(low, high) with 0 <= low <= high",
           ("hd",)),
    Option("per_parameter", False, _flag, "True or False", ("hd",)),
    Option("hyper_step", "additive", _hyper_step, "a policy of hyperoptim.hyperstep or its name",
           ("hd", "marthe")),
    Option("tune", ("lr",), _hd_tune, "('lr',) or ('lr', 'momentum')", ("hd", "marthe"),
           fixed=True),
    Option("momentum_phase", "stall", lambda v: v in ("stall", "run"), "'stall' or 'run'",
           ("hd", "marthe")),
    # MARTHE.
    Option("mu", "adaptive", lambda v: v == "adaptive" if isinstance(v, str)
           else is_number(v) and 0.0 <= float(v) <= 1.0, "'adaptive' or a number in [0, 1]",
           ("marthe",)),
    Option("adapt_hyper_lr", True, _flag, "True or False", ("marthe",)),
    Option("hypergrad_clip", None, lambda v: v is None or (is_number(v) and float(v) > 0.0),
           "None or a number > 0", ("marthe",)),
    # IFT (one-pass implicit differentiation).
    Option("tune", _NAMES, _tune(False), _TUNE + ", not empty", ("ift",), fixed=True),
    Option("per_parameter_lr", False, _flag, "True or False", ("ift",), fixed=True),
    Option("per_parameter_weight_decay", False, _flag, "True or False", ("ift",), fixed=True),
    Option("sharing", "weight", lambda v: v in ("weight", "unit"), "'weight' or 'unit'", ("ift",),
           fixed=True),
    Option("lr_bounds", (1e-10, 1.0), _ift_bounds, "(low, high) with 0 < low <= high < inf",
           ("ift",)),
    Option("hyper_lr", 0.05, _at_least(0.0), _NON_NEGATIVE, ("ift",), in_group=False),
    Option("update_interval", 10, _count, "an integer >= 1", ("ift",), in_group=False),
    Option("lookback", 5, _count, "an integer >= 1", ("ift",), in_group=False),
    Option("update_timing", "taken", lambda v: v in ("taken", "next"), "'taken' or 'next'",
           ("ift",), in_group=False),
    Option("update_schedule", "warmup", lambda v: v in ("warmup", "fixed"), "'warmup' or 'fixed'",
           ("ift",), in_group=False),
    Option("reactive_decrease", True, _flag, "True or False", ("ift",), in_group=False),
    Option("stability_guard", None, lambda v: v is None or _flag(v), "None, True or False",
           ("ift",), in_group=False),
    Option("decay_accel", None, lambda v: v is None or (is_real(v) and 1.0 <= v <= _LIMIT),
           f"None or a number in [1, {_LIMIT:g}]", ("ift",), in_group=False),
    Option("lr_accel", None, lambda v: v is None or (is_real(v) and 1.0 <= v <= _LIMIT),
           f"None or a number in [1, {_LIMIT:g}]", ("ift",), in_group=False),
    Option("warmup_accel", 1.5, lambda v: is_real(v) and 1.0 <= v <= _LIMIT,
           f"a number in [1, {_LIMIT:g}]", ("ift",), in_group=False),
    Option("hyper_optimizer", None, lambda v: v is None or callable(v),
           "None, a torch.optim.Optimizer class or a factory", ("ift",), in_group=False),
    Option("dampening", 0.0, _zero, "0: IFTOptimizer implements heavy-ball momentum "
           "without dampening, as Clarke et al. do", ("ift-sgd",)),
    Option("nesterov", False, lambda v: v is False, "False: IFTOptimizer implements heavy-ball "
           "momentum, as Clarke et al. do", ("ift-sgd",)),
    Option("per_parameter_lr", False, lambda v: v is False, "False: one learning rate per param "
           "group", ("ift-adam",), fixed=True),
    Option("per_parameter_weight_decay", False, lambda v: v is False, "False: one weight decay "
           "per param group", ("ift-adam",), fixed=True),
    # FDS (forward-mode differentiation with sharing): learned schedules may go negative.
    Option("dampening", 0.0, _zero, "0: FDSSGD implements torch.optim.SGD's rule with "
           "dampening=0, the paper's; its tangents assume it", ("fds",)),
    Option("lr", 0.0, _bounded, f"a finite number within +-{_LIMIT:g}", ("fds",)),
    Option("momentum", 0.0, _bounded, f"a finite number within +-{_LIMIT:g}", ("fds",)),
    Option("weight_decay", 0.0, _bounded, f"a finite number within +-{_LIMIT:g}", ("fds",)),
    Option("horizon", None, _count, "an integer >= 1", ("fds",), fixed=True),
    Option("lr_windows", 1, _count, "an integer >= 1", ("fds",), fixed=True),
    Option("momentum_windows", 1, _count, "an integer >= 1", ("fds",), fixed=True),
    Option("weight_decay_windows", 1, _count, "an integer >= 1", ("fds",), fixed=True),
    Option("tune", _NAMES, _tune(True), _TUNE, ("fds",), fixed=True),
    Option("hyper_lr", None, lambda v: v is None or _step_sizes(v),
           f"a step size in (0, {_LIMIT:g}], or a dict from names to step sizes", ("fds",)),
    Option("hz_clip", None, lambda v: v is None or (is_real(v) and v > 0), "None or a number > 0",
           ("fds",)),
    Option("outer_step", "log", lambda v: isinstance(v, str) and v in ("log", "additive"),
           "'log' or 'additive'", ("fds",)),
    Option("lr_schedule", None, _schedule, f"a list of finite numbers within +-{_LIMIT:g}",
           ("fds",)),
    Option("momentum_schedule", None, _schedule, f"a list of finite numbers within +-{_LIMIT:g}",
           ("fds",)),
    Option("weight_decay_schedule", None, _schedule,
           f"a list of finite numbers within +-{_LIMIT:g}", ("fds",)),
)

CLASS_COMPONENTS: dict[str, tuple[str, ...]] = {
    "HypergradSGD": ("torch", "sgd", "hd"),
    "HypergradAdam": ("torch", "adam", "hd"),
    "MartheSGD": ("torch", "sgd", "marthe"),
    "MartheAdam": ("torch", "adam", "marthe"),
    "IFTOptimizer": ("torch", "sgd", "ift", "ift-sgd"),
    "IFTAdam": ("torch", "adam", "ift", "ift-adam"),
    "FDSSGD": ("torch", "sgd", "fds"),
}
"""The components of each public class (subclasses inherit their base's)."""

HYPER_STEP_NAMES: dict[tuple[str, str], str] = {
    ("hd", "hypergrad_lr"): "hyper_lr",
    ("marthe", "hypergrad_lr"): "hyper_lr",
    ("marthe", "adapt_hypergrad_lr"): "adapt_hyper_lr",
    ("ift", "hyper_lr"): "hyper_lr",
    ("fds", "step_sizes"): "hyper_lr",
}
"""(method, old name) -> the name of the hyper-step knobs since 0.2 (module doc)."""

# The old names are still the package's vocabulary: a class that never used one refuses it by
# name rather than leaving it in a group unread.
_VOCABULARY = frozenset({*(o.name for o in OPTIONS if o.in_group),
                         *(old for _, old in HYPER_STEP_NAMES)})
# Keys torch or the package put in groups that are not options.
_NOT_OPTIONS = frozenset({"params", "param_names"})
# Group values given as one-element tensors, stored as floats.
_FLOATS = frozenset({"lr", "momentum", "dampening", "weight_decay", "eps", "hyper_lr"})


def renamed_options(method: str) -> dict[str, str]:
    """Old name -> new name of ``method``'s deprecated options (``"hd"``, ``"marthe"``, ...).

    Example:
        >>> renamed_options("marthe")
        {'hypergrad_lr': 'hyper_lr', 'adapt_hypergrad_lr': 'adapt_hyper_lr'}
    """
    return {old: new for (m, old), new in HYPER_STEP_NAMES.items() if m == method and old != new}


def _deprecated(owner: str, old: str, new: str, where: str) -> None:
    warn(f"{owner}: {old!r} is deprecated{where}, use {new!r}; the old name will be removed in "
         "the next release", DeprecationWarning)


def renamed_group(owner: str, group: Mapping[str, Any], renames: Mapping[str, str], *,
                  where: str = "") -> dict[str, Any]:
    """``group`` (constructor keywords, a per-group dict, a checkpoint's param group) with its old
    names renamed (``renames``: old -> new), one ``DeprecationWarning`` per old name; a copy if
    it held any, else ``group`` itself.

    Raises:
        ValueError: both an old name and its new one are given.
    """
    if not any(old in group for old in renames):
        return group if isinstance(group, dict) else dict(group)
    out = dict(group)
    for old, new in renames.items():
        if old in out:
            if new in out:
                raise ValueError(f"{owner}: got both {old!r} and {new!r}; {old!r} is the "
                                 f"deprecated name of {new!r}: pass {new!r} only")
            _deprecated(owner, old, new, where)
            out[new] = out.pop(old)
    return out


def rename_assigned(owner: str, group: dict[str, Any], renames: Mapping[str, str]) -> None:
    """A value assigned to an old name in a live param group moves to the new one (in place), with
    a ``DeprecationWarning``: the group always holds the new name, so the old one would be
    ignored."""
    for old, new in renames.items():
        if old in group:
            _deprecated(owner, old, new, " as a param_groups key")
            group[new] = group.pop(old)


# Both are looked up at every step (validate_groups): class -> components, components -> table.
_COMPONENTS_OF: dict[type, tuple[str, ...] | None] = {}
_TABLES: dict[tuple[str, ...], dict[str, Option]] = {}


def components(owner: Any) -> tuple[str, ...] | None:
    """The components of ``owner`` (an optimizer or its class), None for an unknown class."""
    cls = owner if isinstance(owner, type) else type(owner)
    try:
        return _COMPONENTS_OF[cls]
    except KeyError:
        pass
    found = next((CLASS_COMPONENTS[base.__name__] for base in cls.__mro__
                  if base.__name__ in CLASS_COMPONENTS), None)
    _COMPONENTS_OF[cls] = found
    return found


def options_of(owner: Any) -> dict[str, Option]:
    """Name -> :class:`Option` for ``owner``'s class (later components override earlier)."""
    return dict(_table(components(owner) or ()))


# A class outside CLASS_COMPONENTS (a new rule or method) gets the checks of these components for
# the keys it has, and no refusal of other keys.
_FALLBACK = ("torch", "sgd", "hd", "marthe")


def _table(parts: tuple[str, ...]) -> dict[str, Option]:
    """Name -> :class:`Option` for ``parts`` (shared: callers must not change it)."""
    table = _TABLES.get(parts)
    if table is None:
        table = _TABLES[parts] = {}
        for part in parts:
            for option in OPTIONS:
                if part in option.used_by:
                    table[option.name] = option
    return table


def _refuse(name: str, value: Any, why: str) -> ValueError:
    # torch.optim's wording: the value as str() shows it (a string without quotes)
    return ValueError(f"Invalid {name} value: {value} ({why})")


# Per option (by id: OPTIONS lives as long as the module), the (type, value) of an atomic value
# (see _ATOMS) that passed its check last: a check is a function of the value alone, and a group
# re-checked at every step mostly holds the values that passed at the last one.
_PASSED: dict[int, tuple[type, Any]] = {}


def _check_one(option: Option, value: Any) -> None:
    kind = type(value)
    last = _PASSED.get(id(option))
    if last is not None and last[0] is kind and last[1] == value:
        return
    if not option.check(value):
        why = option.expect
        raise _refuse(option.name, value, why if why.startswith(("amsgrad", "not "))
                      else f"expected {why}")
    if kind in _ATOMS and value == value:  # NaN never equals the last value
        _PASSED[id(option)] = (kind, value)


def check_arguments(owner: Any, **values: Any) -> None:
    """Check constructor arguments by name against ``owner``'s options (in the order given),
    then the constraints between them; ``ValueError("Invalid <name> value: ...")`` otherwise."""
    table = _table(components(owner) or ())
    for name, value in values.items():
        if name in table:
            _check_one(table[name], value)
    _check_constraints(owner, values)


def check_rule_arguments(rule: str, **values: Any) -> None:
    """:func:`check_arguments` for one update rule's options (``"sgd"``, ``"adam"``)."""
    table = _table((rule,))
    for name, value in values.items():
        _check_one(table[name], value)
    _check_constraints((rule,), values)


def check_group(owner: Any, group: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
                ) -> None:
    """Check every option in a param group (however it entered) for ``owner``'s class.

    A key of the package's vocabulary that this class does not use is refused by name; a key
    outside it is left alone. ``defaults`` (the optimizer's) checks what every group must share.
    """
    table = _table(components(owner) or ())
    if table:
        name = type(owner).__name__ if not isinstance(owner, type) else owner.__name__
        for key, value in group.items():
            if key in _NOT_OPTIONS:
                continue
            if key in table:
                if table[key].in_group:
                    _check_one(table[key], value)
            elif key in _VOCABULARY:
                raise _refuse(key, value, f"{name} has no option {key!r}; it would be ignored")
    else:  # a class outside the table (a new rule or method): the checks every group shares
        fallback = _table(_FALLBACK)
        # ``tune`` names what a method learns, and methods learn different things (IFT and FDS
        # more than HD): a class of unknown method is held to no one method's list.
        fallback.pop("tune", None)
        for key, value in group.items():
            if key in fallback:
                _check_one(fallback[key], value)
    _check_constraints(owner, group)
    if defaults is not None and "maximize" in group and \
            group["maximize"] != defaults.get("maximize", False):
        raise ValueError(f"Invalid maximize value: {group['maximize']} (every param group of "
                         "one optimizer shares one objective: set it in the constructor)")


def _check_constraints(owner: Any, group: Mapping[str, Any],
                       changed: Collection[str] | None = None) -> None:
    """The constraints between options (each message names the options involved), checked in
    the order of :data:`_CONSTRAINTS`; with ``changed``, only those that read one of these
    names (the others held when the group last passed, and it holds the same values for them)."""
    parts = owner if isinstance(owner, tuple) else components(owner) or ()
    for check, reads in _CONSTRAINTS:
        if changed is None or not reads.isdisjoint(changed):
            check(parts, group)


def _nesterov_needs_momentum(parts: tuple[str, ...], group: Mapping[str, Any]) -> None:
    # FDS learns its momentum schedule (it may pass 0 with Nesterov on): no constraint there.
    if group.get("nesterov") is True and ("sgd" in parts or not parts) and "fds" not in parts and (
            not is_number(group.get("momentum", 0.0)) or float(group.get("momentum", 0.0)) <= 0
            or group.get("dampening", 0) != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def _lr_within_bounds(parts: tuple[str, ...], group: Mapping[str, Any]) -> None:
    bounds, lr = group.get("lr_bounds"), group.get("lr")
    tune = group.get("tune")
    tuned = "ift" not in parts or (isinstance(tune, (tuple, list)) and "lr" in tune)
    if (bounds is not None and lr is not None and tuned and _hd_bounds(bounds) and is_number(lr)
            and not bounds[0] <= float(lr) <= bounds[1]):
        raise _refuse("lr", lr, f"outside lr_bounds={tuple(bounds)}")


def _ift_tune_fits(parts: tuple[str, ...], group: Mapping[str, Any]) -> None:
    tune = group.get("tune")
    if "ift" not in parts or not isinstance(tune, (tuple, list)):
        return
    if "momentum" in tune and is_number(group.get("momentum", 0.0)) and \
            float(group.get("momentum", 0.0)) > 1.0:
        raise _refuse("momentum", group["momentum"], "a tuned momentum lies in [0, 1]")
    for name, key in (("lr", "per_parameter_lr"), ("weight_decay", "per_parameter_weight_decay")):
        if group.get(key) is True and name not in tune:
            raise ValueError(f"{key}=True needs '{name}' in tune (tune={tuple(tune)})")


def _fds_windows_fit(parts: tuple[str, ...], group: Mapping[str, Any]) -> None:
    if "fds" not in parts:
        return
    horizon = group.get("horizon")
    for name in _NAMES:
        n, schedule = group.get(f"{name}_windows"), group.get(f"{name}_schedule")
        if _count(horizon) and _count(n) and n > horizon:
            raise _refuse(f"{name}_windows", n, f"expected 1 <= {name}_windows <= "
                          f"horizon={horizon}")
        if schedule is not None and _count(n) and isinstance(schedule, (list, tuple)) \
                and len(schedule) != n:
            raise _refuse(f"{name}_schedule", schedule, f"expected {n} values, one per window")


# In this order: where a group breaks two constraints, the first one here is reported. Beside
# each, every group key it reads (refresh_passed re-checks only those a step changed).
_CONSTRAINTS: tuple[tuple[Callable[[tuple[str, ...], Mapping[str, Any]], None], frozenset[str]],
                    ...] = (
    (_nesterov_needs_momentum, frozenset({"nesterov", "momentum", "dampening"})),
    (_lr_within_bounds, frozenset({"lr_bounds", "lr", "tune"})),
    (_ift_tune_fits, frozenset({"tune", "momentum", "per_parameter_lr",
                                "per_parameter_weight_decay"})),
    (_fds_windows_fit, frozenset({"horizon", "lr_windows", "momentum_windows",
                                  "weight_decay_windows", "lr_schedule", "momentum_schedule",
                                  "weight_decay_schedule"})),
)


def coerce_group(group: dict[str, Any]) -> None:
    """Store one-element floating tensors given for float options as Python floats (in place)."""
    _coerce(group)


def _coerce(group: dict[str, Any]) -> bool:
    """:func:`coerce_group`; True if it stored anything."""
    wrote = False
    for key in _FLOATS:
        value = group.get(key)
        if isinstance(value, Tensor) and is_number(value):
            group[key] = float(value.item())
            wrote = True
    return wrote


def fixed_values(owner: Any, group: Mapping[str, Any]) -> dict[str, Any]:
    """The group's values of ``owner``'s :attr:`Option.fixed` options (kept when it is added)."""
    return {name: group[name] for name, option in _table(components(owner) or ()).items()
            if option.fixed and name in group}


def validate_groups(optimizer: Any) -> None:
    """Check every param group again (values assigned after construction, by the user or a
    scheduler), before a step writes anything; the error says which group.

    A :attr:`Option.fixed` option must still hold the value it had when the group was added
    (``optimizer._fixed_options``, one dict per group, kept by ``add_param_group`` and
    ``load_state_dict``).

    A group that holds exactly what it held when it last passed (see :func:`_fingerprint`) passes
    again without the checks: they depend on nothing else (the class, its defaults' ``maximize``
    and the fixed options are part of the comparison)."""
    fixed = getattr(optimizer, "_fixed_options", None)
    maximize = getattr(optimizer, "defaults", {}).get("maximize")
    passed = optimizer.__dict__.get("_groups_passed") or []
    now: list[tuple[Any, ...]] = []
    for i, group in enumerate(optimizer.param_groups):
        fixed_i = fixed[i] if fixed is not None and i < len(fixed) else None
        params = group.get("params")
        params = tuple(params) if type(params) is list else None
        print_ = _fingerprint(group) if params is not None else None
        key = (group, fixed_i, maximize, params, print_)
        if i < len(passed) and print_ is not None and _unchanged(passed[i], key):
            now.append(passed[i])
            continue
        if _recheck_group(optimizer, i, group, fixed_i) and print_ is not None:
            key = (group, fixed_i, maximize, params, _fingerprint(group))
        now.append(key)
    optimizer.__dict__["_groups_passed"] = now


_MISSING = object()  # a learned name that a group no longer holds


def refresh_passed(optimizer: Any, learned: Callable[[dict[str, Any]], tuple[str, ...]]) -> None:
    """After a step: a group whose learned values (its ``learned`` names, what the step itself
    writes) changed passes :func:`validate_groups` at the next step unchecked, as long as nothing
    else in it changed.

    The changed values still get their own checks and the constraints between options that read
    them (where one fails, the group is left for the next step's full check, which reports it).
    Only the learned names are compared here: their entries in the fingerprint that passed are
    replaced by the values found now, and any other change since (a new or removed key, another
    value) leaves that fingerprint different from the group's at the next step, whose full check
    then runs. Without this, every group of a method that learns its lr would be checked in full
    at every step."""
    passed = optimizer.__dict__.get("_groups_passed")
    groups = optimizer.param_groups
    if not passed or len(passed) != len(groups):
        return
    for i, group in enumerate(groups):
        last = passed[i]
        old = last[4]
        if last[0] is not group or old is None:
            continue
        # Where each key's entry stands in the fingerprint (kept beside it after the first step).
        at = last[5] if len(last) > 5 else {entry[0]: k for k, entry in enumerate(old)}
        entries, changed = _learned_entries(group, old, at, learned(group))
        if changed and _changed_values_pass(optimizer, group, changed):
            passed[i] = (*last[:4], entries, at)


def _changed_values_pass(optimizer: Any, group: Mapping[str, Any], changed: list[str]) -> bool:
    """Do the ``changed`` values of ``group`` (options of ``optimizer``'s class that a group
    holds) pass their own checks and the constraints that read them?"""
    table = _table(components(optimizer) or ())
    if not all([name in table and table[name].in_group for name in changed]):
        return False
    try:
        for name in changed:
            _check_one(table[name], group[name])
        _check_constraints(optimizer, group, changed)
    except ValueError:
        return False
    return True


def _learned_entries(group: Mapping[str, Any], old: tuple[Any, ...], at: Mapping[str, int],
                     names: tuple[str, ...]) -> tuple[tuple[Any, ...], list[str]]:
    """``old`` (a fingerprint) with the entries of the learned ``names`` replaced by what
    ``group`` holds now, and which of them changed; none where one is no longer an atom (or was
    removed): the next step then checks the group in full."""
    entries = list(old)
    changed = []
    for name in names:
        k = at.get(name)
        if k is None:
            continue
        value = group.get(name, _MISSING)
        if type(value) not in _ATOMS:
            return old, []
        entry = (name, type(value), value)
        if entry != old[k]:  # NaN never equals: checked, refused, left to the full check
            entries[k] = entry
            changed.append(name)
    return tuple(entries), changed


def _unchanged(last: tuple[Any, ...], now: tuple[Any, ...]) -> bool:
    """Whether a group holds what it held when it passed (:func:`validate_groups`' cache)."""
    # Identity for the group, its fixed options and its parameters (tensors do not compare with
    # ==); the fingerprint and maximize by value. A group that passed holds no old name (renamed
    # then), so an old name assigned since changes the fingerprint.
    params, old = now[3], last[3]
    return (last[0] is now[0] and last[1] is now[1] and last[2] == now[2]
            and len(old) == len(params) and all(map(operator.is_, old, params))
            and last[4] == now[4])


def _recheck_group(optimizer: Any, i: int, group: dict[str, Any],
                   fixed_i: dict[str, Any] | None) -> bool:
    """Every check of one group (old names renamed, tensors stored as floats, an IFT rate taken
    into its bounds); True if it wrote anything into the group."""
    renames = getattr(optimizer, "_renamed_options", {})
    wrote = any(old in group for old in renames)
    rename_assigned(type(optimizer).__name__, group, renames)
    wrote = _coerce(group) or wrote
    wrote = _ift_lr_into_bounds(optimizer, group) or wrote
    try:
        if fixed_i is not None:
            for name, value in fixed_i.items():
                if group.get(name) != value:
                    raise _refuse(name, group.get(name), f"it was {value} when the group was "
                                  "added and shapes what the optimizer keeps for it: add a "
                                  "new param group, or build a new optimizer")
        optimizer._check_group(group)
    except ValueError as err:
        raise ValueError(f"{err} (param_groups[{i}], assigned after construction, e.g. by a "
                         "scheduler)") from None
    return wrote


def _ift_lr_into_bounds(optimizer: Any, group: dict[str, Any]) -> bool:
    """IFT learns log10(lr) within lr_bounds: a value assigned from outside (a warm-up from 0)
    is taken into them, as its hyper-update does, rather than refused. True if it wrote."""
    if "ift" not in (components(optimizer) or ()):
        return False
    bounds, lr = group.get("lr_bounds"), group.get("lr")
    if not (_ift_bounds(bounds) and is_number(lr) and "lr" in group.get("tune", ())):
        return False
    taken = min(max(float(lr), bounds[0]), bounds[1])
    if taken is lr:
        return False
    group["lr"] = taken
    return True


def _fingerprint(group: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """Every key of ``group`` but ``params`` with its value and its value's type (for a tuple or
    list, its items' types too): equal fingerprints hold equal values of equal types, which
    every check treats alike. ``None`` where a value is of any other type (a tensor, a dict, a
    policy object: it could change in place); such a group is checked at every step."""
    out: list[Any] = []
    for key, value in group.items():
        if key == "params":
            continue
        kind = type(value)
        if kind in _ATOMS:
            out.append((key, kind, value))
        elif kind is tuple or kind is list:
            kinds = tuple(map(type, value))
            if not _ATOMS.issuperset(kinds):
                return None
            out.append((key, kind, kinds, tuple(value)))
        else:
            return None
    return tuple(out)
