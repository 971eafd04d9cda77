"""Loading a ``torch.optim`` checkpoint into the matching hyperoptim optimizer.

``torch.optim.SGD``'s state dict loads into :class:`~hyperoptim.HypergradSGD`,
:class:`~hyperoptim.MartheSGD`, :class:`~hyperoptim.IFTOptimizer` and :class:`~hyperoptim.FDSSGD`;
``torch.optim.Adam``'s into :class:`~hyperoptim.HypergradAdam`, :class:`~hyperoptim.MartheAdam`
and :class:`~hyperoptim.IFTAdam` (``AdamW``'s into their ``W`` versions). What torch saved is
kept: every value torch's param groups share with ours (``lr``, ``momentum``, ``betas``,
``weight_decay``, ...) and torch's per-parameter state (``momentum_buffer``; ``step``,
``exp_avg``, ``exp_avg_sq``). Everything torch does not have (the hyper-step sizes and other
options of the class, tangents, the hyper optimizer's state, ``hyper_state``) is this
optimizer's current, normally fresh, value; ``history[i]["note"]`` records the migration.
"""

from __future__ import annotations

from typing import Any

__all__ = ["from_torch"]

_NOTE = "loaded torch.optim.{0} state dict: its values and per-parameter state kept, hyper state fresh"


def _family(groups: list[dict[str, Any]]) -> str | None:
    if not groups:
        return None
    if "betas" in groups[0]:
        return "AdamW" if groups[0].get("decoupled_weight_decay") else "Adam"
    if "momentum" in groups[0]:
        return "SGD"
    return None


def _torch_source(optimizer: Any, state_dict: dict[str, Any]) -> str | None:
    """The torch.optim class that saved ``state_dict`` if it is a plain torch state dict this
    optimizer can migrate (``None``: load it as it is); ValueError if it is of another kind."""
    if "optimizer_class" in state_dict or "hyper_state" in state_dict:
        return None
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or not isinstance(state_dict.get("state"), dict):
        return None
    name = type(optimizer).__name__
    source, target = _family(saved_groups), _family(optimizer.param_groups)
    if source is None or target is None:
        return None
    if source != target:
        raise ValueError(f"{name}.load_state_dict: this is a torch.optim.{source} state dict, and "
                         f"{name} steps like torch.optim.{target}: load it into the hyperoptim "
                         f"class over {source} instead")
    if len(saved_groups) != len(optimizer.param_groups):
        return None  # the usual check reports the mismatch
    return source


def _group(saved: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
    """Our param group with torch's values where torch has them."""
    ours = {k: (saved[k] if k in saved else v) for k, v in group.items() if k != "params"}
    for schedule in ("lr", "momentum", "weight_decay"):  # FDSSGD: start every window there
        key = f"{schedule}_schedule"
        if key in ours and schedule in saved:
            ours[key] = [float(saved[schedule])] * len(group[key])
    ours["params"] = list(saved.get("params", []))
    return ours


def from_torch(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` rewritten as ``optimizer`` would have saved it, if it is a plain
    ``torch.optim`` state dict of the matching kind; any other state dict is returned unchanged.

    Raises:
        ValueError: a torch state dict of another kind (an Adam checkpoint into an SGD-based
            optimizer, Adam into AdamW), with the class it fits.
    """
    source = _torch_source(optimizer, state_dict)
    if source is None:
        return state_dict
    groups, state = [], {}
    for saved, group in zip(state_dict["param_groups"], optimizer.param_groups):
        ours = _group(saved, group)
        groups.append(ours)
        for index, p in zip(ours["params"], group["params"]):
            entry = dict(optimizer.state.get(p, {}))
            entry.update(state_dict["state"].get(index, {}))
            if entry:
                state[index] = entry
    history = [{k: list(v) for k, v in h.items()} for h in optimizer.history]
    for h in history:
        h.setdefault("note", []).append(_NOTE.format(source))
    return {"state": state, "param_groups": groups, "optimizer_class": type(optimizer).__name__,
            "history": history, "history_limit": optimizer.history_limit,
            "hyper_state": optimizer.hyper_state}
