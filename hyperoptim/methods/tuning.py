r"""What HD and MARTHE share about their param groups: the hyper-step policy and the tuned
hyperparameters each group carries (``hyper_step``, ``tune``), checkpoints saved before either
existed, and the entries of a learned momentum."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from ..core.shard import is_sharded
from ..core.types import ParamsT
from ..hyperstep import Additive, new_stall, resolve

__all__ = ["TunedGroups", "lr_only_when_untuned"]


def lr_only_when_untuned(state_dict: Any) -> Any:
    """``state_dict`` with ``tune=("lr",)`` in every group saved without one: a state dict this
    package saved before the method learned momentum tuned the learning rate alone (a torch.optim
    one, without ``optimizer_class`` or ``hyper_state``, takes this optimizer's groups' values:
    core.migrate)."""
    ours = isinstance(state_dict, dict) and ("optimizer_class" in state_dict
                                              or "hyper_state" in state_dict)
    groups = state_dict.get("param_groups") if ours else None
    if not isinstance(groups, list):
        return state_dict
    return {**state_dict, "param_groups": [
        {"tune": ("lr",), **g} if isinstance(g, dict) else g for g in groups]}


def _listed(params: ParamsT) -> list[Any]:
    """``params`` as a list whose groups' ``"params"`` are lists too (each is read twice: once
    for the defaults, once by ``torch.optim``; a generator would be empty the second time)."""
    if isinstance(params, Tensor):
        return [params]
    out: list[Any] = []
    for item in params:
        if isinstance(item, dict) and "params" in item:
            ps = item["params"]
            item = {**item, "params": [ps] if isinstance(ps, Tensor) else list(ps)}
        out.append(item)
    return out


def _learns_momentum(group: dict[str, Any]) -> bool:
    """Whether the group learns its momentum (``"momentum"`` in ``tune``)."""
    return "momentum" in group.get("tune", ())


class TunedGroups:
    """The param-group handling of :class:`~hyperoptim.methods.hd.RuleHypergrad` and
    :class:`~hyperoptim.methods.marthe.RuleMarthe`, a part of each (before
    :class:`~hyperoptim.core.base.HyperOptimizer` in their bases). A class over a rule that names
    its momentum otherwise (Adam's ``betas``) overrides :meth:`_momentum` and
    :meth:`_momentum_entry`."""

    #: Whether ``tune=None`` learns the momentum (see :meth:`_default_tune`).
    default_learns_momentum: ClassVar[bool] = False

    def _default_tune(self, defaults: dict[str, Any], policy: str, params: list[Any]
                      ) -> tuple[str, ...]:
        """What ``tune=None`` learns (for the ``defaults``, and for each group with its own
        values and ``params``, by :meth:`add_param_group`): the momentum too where the class
        learns it by default (:attr:`default_learns_momentum`), the rule has one (a momentum above 0: torch's
        ``SGD(momentum=0)`` stays plain SGD), the policy reads the training loss, which
        ``momentum_phase="stall"`` watches, and no parameter is FSDP2-sharded (a learned
        momentum does not support them yet); else the learning rate alone, so the additive
        policy (the papers' settings, ``hyper_lr=``) keeps every trajectory it had before."""
        learns = (self.default_learns_momentum and self._momentum(defaults) > 0.0
                  and resolve(policy).uses_loss
                  and not any(is_sharded(p[-1] if isinstance(p, tuple) else p) for item in params
                              for p in (item["params"] if isinstance(item, dict) else [item])))
        return ("lr", "momentum") if learns else ("lr",)

    def _resolved_tune(self, defaults: dict[str, Any], tune: Any, policy: str) -> tuple[str, ...]:
        """The constructor's ``tune`` for the ``defaults``: as given, or under ``tune=None`` the
        class's default (:meth:`_default_tune`), which each group then resolves for its own
        values (:meth:`add_param_group`)."""
        self._default_tuned = tune is None
        return self._default_tune(defaults, policy, []) if tune is None else tuple(tune)

    def _refuse_sharded_momentum(self, group: dict[str, Any]) -> None:
        """A group that learns its momentum cannot hold FSDP2 (``fully_shard``) parameters yet."""
        if _learns_momentum(group) and any(is_sharded(p) for p in group.get("params", ())):
            raise ValueError(f"{type(self).__name__}(tune=('lr', 'momentum')) does not support "
                             "FSDP2 (fully_shard) yet: tune=('lr',) does.")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; under ``tune=None`` a group that does not set its ``tune``
        takes the default resolved for its own values (a group with ``momentum=0`` stays plain
        SGD while the others learn theirs)."""
        if getattr(self, "_default_tuned", False) and isinstance(param_group, dict) \
                and "tune" not in param_group:
            param_group = _listed([param_group])[0]
            values = {**self.defaults, **param_group}
            param_group = {**param_group, "tune": self._default_tune(
                values, values.get("hyper_step", Additive.name), [param_group])}
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # A checkpoint saved before the policies existed took the additive step (MARTHE's
            # own), and one saved before the momentum was learned tuned the learning rate alone.
            group.setdefault("hyper_step", Additive.name)
            group.setdefault("tune", ("lr",))
            if self._phases_momentum():
                # Saved before momentum_phase existed: a learned momentum was learned all run.
                group.setdefault("momentum_phase", "run")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = lr_only_when_untuned(state_dict)
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if self._phases_momentum() and isinstance(groups, list) and (
                "optimizer_class" in state_dict or "hyper_state" in state_dict):
            # Saved before momentum_phase existed: a learned momentum was learned all run.
            state_dict = {**state_dict, "param_groups": [
                {"momentum_phase": "run", **g} if isinstance(g, dict) else g for g in groups]}
        super().load_state_dict(state_dict)

    def _phases_momentum(self) -> bool:
        """Whether the class has the ``momentum_phase`` option (HD's and MARTHE's classes)."""
        return "momentum_phase" in getattr(self, "defaults", {})

    def _stall(self) -> dict[str, Any]:
        """The run's stall state (:func:`~hyperoptim.hyperstep.watch_stall`; ``hyper_state
        ["stall"]``, a new one before the first step that watched it)."""
        return self.hyper_state.get("stall") or new_stall()

    def _watches_stall(self) -> bool:
        """Whether this step's training loss goes to the stall watch: some group learns its
        momentum while the run is stalled (``momentum_phase="stall"``) and the run still is."""
        return any(_learns_momentum(g) and g.get("momentum_phase", "run") == "stall"
                   for g in self.param_groups) and self._stall()["stalled"]

    def _momentum_live(self, group: dict[str, Any]) -> bool:
        """Whether the group's momentum is learned at this step: it is tuned, and either all run
        (``momentum_phase="run"``) or while the run is stalled and the run still is."""
        return _learns_momentum(group) and (group.get("momentum_phase", "run") == "run"
                                            or self._stall()["stalled"])

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        """The inner rule's momentum, which paces a policy's growth (SGD's ``momentum``)."""
        return float(group.get("momentum", 0.0))

    @staticmethod
    def _momentum_entry(group: dict[str, Any], value: float) -> dict[str, Any]:
        """The param-group entries that set the rule's momentum to ``value``."""
        return {"momentum": value}
