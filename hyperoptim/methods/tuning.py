r"""What HD and MARTHE share about their param groups: the hyper-step policy and the tuned
hyperparameters each group carries (``hyper_step``, ``tune``), checkpoints saved before either
existed, and the entries of a learned momentum."""

from __future__ import annotations

from typing import Any

from ..core.shard import is_sharded
from ..hyperstep import Additive

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


def _learns_momentum(group: dict[str, Any]) -> bool:
    """Whether the group learns its momentum (``"momentum"`` in ``tune``)."""
    return "momentum" in group.get("tune", ())


class TunedGroups:
    """The param-group handling of :class:`~hyperoptim.methods.hd.RuleHypergrad` and
    :class:`~hyperoptim.methods.marthe.RuleMarthe`, a part of each (before
    :class:`~hyperoptim.core.base.HyperOptimizer` in their bases). A class over a rule that names
    its momentum otherwise (Adam's ``betas``) overrides :meth:`_momentum` and
    :meth:`_momentum_entry`."""

    def _refuse_sharded_momentum(self, group: dict[str, Any]) -> None:
        """A group that learns its momentum cannot hold FSDP2 (``fully_shard``) parameters yet."""
        if _learns_momentum(group) and any(is_sharded(p) for p in group.get("params", ())):
            raise ValueError(f"{type(self).__name__}(tune=('lr', 'momentum')) does not support "
                             "FSDP2 (fully_shard) yet: tune=('lr',) does.")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # A checkpoint saved before the policies existed took the additive step (MARTHE's
            # own), and one saved before the momentum was learned tuned the learning rate alone.
            group.setdefault("hyper_step", Additive.name)
            group.setdefault("tune", ("lr",))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(lr_only_when_untuned(state_dict))

    @staticmethod
    def _momentum(group: dict[str, Any]) -> float:
        """The inner rule's momentum, which paces a policy's growth (SGD's ``momentum``)."""
        return float(group.get("momentum", 0.0))

    @staticmethod
    def _momentum_entry(group: dict[str, Any], value: float) -> dict[str, Any]:
        """The param-group entries that set the rule's momentum to ``value``."""
        return {"momentum": value}
