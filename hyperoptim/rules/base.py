r"""Update rules as values: the interface every method consumes, and its generic derivatives.

**Rules as values.** Every method consumes an :class:`UpdateRule`: a pure ``step`` (weights,
gradients, per-parameter buffers, hyperparameters, step counts) that is bit-identical to the torch
optimizer with float hyperparameters and differentiable with tensor ones, the same step in place
(``step_``, which also returns the direction :math:`d = -\partial w' / \partial a`), and how a
param group and ``state[p]`` feed them. :func:`rule_tangents` (Jacobian-vector products of the
rule by autograd) and :func:`rule_vjp` (reverse mode, ``torch.func.vjp``, buffers detached) work
for any rule; a rule may register its closed-form tangents (:attr:`UpdateRule.tangents`), which
both then use (``generic=True`` keeps autograd, the reference). Registered: :data:`SGD` here
and ``ADAM`` (:mod:`hyperoptim.rules.adam`, Adam and AdamW).
A new rule is one file defining its ``step``/``step_`` and calling :func:`register_rule`, plus its
import line at the end of this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.types import Hyper
from .algebra import _lr_list, _n_cols

__all__ = [
    "RULES", "Buffers", "UpdateRule", "apply_update_", "get_rule", "register_rule", "rule_diagonals",
    "rule_tangents", "rule_vjp",
]


def apply_update_(params: Sequence[Tensor], directions: Sequence[Tensor],
                  lr: Hyper | Sequence[Tensor]) -> None:
    r"""In place, :math:`w \leftarrow w - a\, d` (``torch.optim.SGD``'s last line; not differentiable).

    ``lr`` is a float, a 0-d tensor, or a sequence with one (0-d or parameter-shaped) tensor per
    parameter: per-weight learning rates.
    """
    for param, d, a in zip(params, directions, _lr_list(lr, len(params))):
        if isinstance(a, Tensor):
            param.addcmul_(d, a, value=-1)
        else:
            param.add_(d, alpha=-a)


# ---------------------------------------------------------------------------------------------
# The rule as a value (docs/design.md §3): every method consumes an UpdateRule; tangents and reverse
# products come from autograd on the rule's pure ``step``, or from the rule's own closed form
# (tested equal to it), never from a derivative typed in a method.
# ---------------------------------------------------------------------------------------------

Buffers = dict[str, list[Tensor | None]]
"""A rule's per-parameter state, by buffer name (``state[p]`` keys, as torch names them)."""


@dataclass(frozen=True)
class UpdateRule:
    r"""An inner update rule :math:`(w, g, s; \lambda) \mapsto (w', s')`, the unit every method
    consumes.

    A rule is two functions over lists of tensors (one entry per parameter) and what describes them:

    - ``step(params, grads, buffers, hypers, counts, **options) -> (new_params, new_buffers)``:
      pure (nothing is modified). With Python-float ``hypers`` it performs exactly the
      floating-point operations of the torch optimizer it mirrors (so frozen hyperparameters are
      bit-identical to it); with 0-d tensor ``hypers`` it is differentiable in them, and
      :func:`rule_tangents` / :func:`rule_vjp` differentiate it with ``torch.func``.
    - ``step_(params, grads, buffers, hypers, counts, **options) -> (new_buffers, directions)``:
      the same step in place, as the torch optimizer does it (float ``hypers``; ``hypers["lr"]``
      may also be a list of per-parameter tensors: per-weight learning rates). ``directions[i]``
      is :math:`d_t = -\partial w_{t+1} / \partial a_t` for parameter ``i`` (the step's direction
      with respect to the learning rate; it may alias a buffer, never a gradient).

    ``buffers`` maps each name in ``buffer_names`` to one tensor (or ``None``: not created yet)
    per parameter; ``counts`` is the step number :math:`t \ge 1` of this step per parameter
    (torch's ``state["step"]`` after its increment) for rules with ``uses_counts``, else ``None``.

    Attributes:
        name (str): the registry key (:data:`RULES`).
        hyper_names (tuple of str): the hyperparameters ``step`` can differentiate.
        buffer_names (tuple of str): the per-parameter state the rule carries.
        uses_counts (bool): the rule reads per-parameter step counts (torch keeps them in
            ``state[p]["step"]``).
        hypers (callable): a param group -> its float hyperparameters, keyed by ``hyper_names``.
        options (callable): a param group -> the static keyword options of ``step``/``step_``.
        step, step_ (callable): as above.
        init_state (callable): a parameter -> the state entries a fresh parameter starts with
            (default: none).
        elementwise (bool): ``step`` treats every element on its own, given the per-parameter
            scalars (hyperparameters, the step count): element ``k`` of each output depends only
            on element ``k`` of the weights, gradients and buffers. Then the parameters that share
            a dtype, device, step count and which buffers exist can be concatenated into one
            vector, and :func:`rule_tangents` does so (a handful of large operations instead of
            one set per parameter; the numbers are the same up to rounding).
            True for SGD and Adam; a rule with per-tensor norms (LARS, Adafactor) must leave it
            False (default: False).
        tangents (callable, optional): the rule's closed-form Jacobian-vector product, an
            optional fast path that :func:`rule_tangents` and :func:`rule_vjp` use in place of
            autograd: ``tangents(params, grads, buffers, hypers, z, hz, buffer_tangents, seeds,
            counts, **options) -> (z_next, buffer_tangents_next)`` with :func:`rule_tangents`'s
            arguments and results (``z``/``hz`` may be ``None``: no incoming tangent; any
            hyperparameter may be a list of per-parameter tensors). It must equal the generic
            path to rounding (``tests/test_rule_closed_forms.py`` checks every registered one);
            ``None`` means autograd only (default: None).
        edge (callable, optional): ``edge(hypers, options) -> float``, the rule's edge of
            stability: on a quadratic whose Hessian has eigenvalue :math:`\lambda` along
            :math:`q`, the rule's iteration is stable exactly while the Rayleigh quotient of the
            update's weight Jacobian, :math:`\rho = q^\top (\partial u / \partial w)\, q /
            q^\top q` (:math:`u = w - w'`, the rule's state held constant, as IFT's update
            function is), stays below it. The IFT classes' ``stability_guard`` reads it; ``None``
            means the rule has none (default: None).
    """

    name: str
    hyper_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    uses_counts: bool
    hypers: Callable[[dict[str, Any]], dict[str, float]]
    options: Callable[[dict[str, Any]], dict[str, Any]]
    step: Callable[..., tuple[list[Tensor], Buffers]]
    step_: Callable[..., tuple[Buffers, list[Tensor]]]
    init_state: Callable[[Tensor], dict[str, Tensor]] = lambda p: {}
    elementwise: bool = False
    tangents: Callable[..., tuple[list[Tensor], Buffers]] | None = None
    edge: Callable[[dict[str, Any], dict[str, Any]], float] | None = None

    def read_state(self, states: Sequence[dict[str, Any]], params: Sequence[Tensor]
                   ) -> tuple[Buffers, list[float] | None]:
        """The buffers and this step's counts from ``state[p]`` dicts, initialising new ones
        (torch's lazy state: e.g. Adam's zero moments and ``step``) without touching existing ones.

        Reading a count is a ``.item()`` of a CPU tensor, as torch's Adam does: no device sync.
        """
        fresh: dict[str, list[tuple[dict[str, Any], Tensor]]] = {}
        for s, p in zip(states, params):
            # Only a parameter that lacks some of the rule's state is initialised: building fresh
            # zero buffers for every parameter at every step, to throw them away, cost Adam
            # ~80 us per step on a small MLP.
            if any(name not in s for name in self.buffer_names) or (self.uses_counts and "step" not in s):
                for key, value in self.init_state(p).items():
                    if key not in s:
                        s[key] = value
                        if key in self.buffer_names and isinstance(value, Tensor):
                            fresh.setdefault(key, []).append((s, value))
        for key, made in fresh.items():
            _side_by_side_buffers(key, made)
        buffers = {name: [s.get(name) for s in states] for name in self.buffer_names}
        counts = [float(s["step"]) + 1.0 for s in states] if self.uses_counts else None
        return buffers, counts

    def write_state(self, states: Sequence[dict[str, Any]], buffers: Buffers) -> None:
        """Store a step's new buffers (``None`` removes nothing) and advance the counts."""
        for name in self.buffer_names:
            for s, b in zip(states, buffers[name]):
                if b is not None:
                    s[name] = b
        if self.uses_counts:
            for s in states:
                s["step"] += 1


def _side_by_side_buffers(key: str, made: list[tuple[dict[str, Any], Tensor]]) -> None:
    """Move the buffers ``key`` just initialised for several parameters (``(state, buffer)``
    pairs) into one storage, back to back, values unchanged: an elementwise rule's flat
    tangent step then reads them as one vector without a copy (:func:`_flat`; under FSDP2 a
    whole shard per buffer at the step's memory peak). Each stays its own tensor, updated in
    place per parameter as before; buffers of mixed dtypes or devices, that autograd tracks, or
    that are not plain tensors (a ``DTensor`` of a sharded parameter) are left as they are."""
    if len(made) < 2:
        return
    first = made[0][1]
    if any(type(b) is not Tensor or b.dtype != first.dtype or b.device != first.device
           or b.requires_grad or not b.is_contiguous() for _, b in made):
        return
    joined = torch.cat([b.reshape(-1) for _, b in made])
    for (s, b), part in zip(made, joined.split([b.numel() for _, b in made]), strict=True):
        s[key] = part.view(b.shape)


RULES: dict[str, UpdateRule] = {}
"""Every registered rule by name; a new rule is one file that calls :func:`register_rule`."""


def register_rule(rule: UpdateRule) -> UpdateRule:
    """Add ``rule`` to :data:`RULES` (its name must be new) and return it."""
    if rule.name in RULES:
        raise ValueError(f"Invalid rule value: {rule.name!r} is already registered")
    RULES[rule.name] = rule
    return rule


def get_rule(name: str) -> UpdateRule:
    """The registered rule called ``name``."""
    if name not in RULES:
        raise ValueError(f"Invalid rule value: {name!r} (registered: {', '.join(sorted(RULES))})")
    return RULES[name]


def _pack(buffers: Buffers, names: Sequence[str]) -> tuple[list[tuple[int, int]], tuple[Tensor, ...]]:
    """The non-``None`` buffers as a flat tuple, and where each came from (name index, param)."""
    where, flat = [], []
    for k, name in enumerate(names):
        for i, b in enumerate(buffers[name]):
            if b is not None:
                where.append((k, i))
                flat.append(b)
    return where, tuple(flat)


def _unpack(where: list[tuple[int, int]], flat: Sequence[Tensor], names: Sequence[str],
            n: int) -> Buffers:
    out: Buffers = {name: [None] * n for name in names}
    for (k, i), b in zip(where, flat):
        out[names[k]][i] = b
    return out


def rule_tangents(
    rule: UpdateRule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Buffers,
    hypers: dict[str, Hyper],
    z: Sequence[Tensor] | None,
    hz: Sequence[Tensor] | None,
    buffer_tangents: Buffers,
    seeds: dict[str, Tensor],
    *,
    counts: Sequence[float] | None = None,
    generic: bool = False,
    **options: Any,
) -> tuple[list[Tensor], Buffers]:
    r"""Forward tangents through one step of any rule: its closed form where it registers one
    (:attr:`UpdateRule.tangents`), else by autograd of its ``step``.

    :math:`(Z, S)_{t+1} = \frac{\partial \Phi}{\partial (w, s)} (Z, S)_t + \frac{\partial
    \Phi}{\partial g} (H Z)_t + \sum_x \frac{\partial \Phi}{\partial x} e_x`, one column per
    leading index. Nothing here knows the rule's formula: a rule's closed form, where it has one,
    is its own (and is tested equal to this generic path, ``generic=True``, to rounding).

    *How (generic).* The Jacobian-vector product :math:`J T` comes from two reverse passes (the
    "double-vjp" trick): :math:`u \mapsto J^\top u` is linear in the cotangent :math:`u`, so its
    own vector-Jacobian product along :math:`T` is :math:`J T`. One forward pass of ``step`` with
    a graph, one backward pass with ``create_graph=True``, then one backward pass per column. On
    CPU builds where forward-mode AD runs each operation through Python decompositions
    (``torch.func.jvp`` costs about a millisecond per elementwise operation with torch 2.13),
    this is several times faster; the numbers agree with ``torch.func.jvp`` to rounding
    (``tests/test_update.py``). An ``elementwise`` rule is first applied to one concatenated
    vector per dtype, device, step count and buffer pattern (:attr:`UpdateRule.elementwise`).

    Args:
        rule (UpdateRule): the rule :math:`\Phi`.
        params, grads, buffers: the primal state before the step (see :class:`UpdateRule`).
        hypers (dict): this step's hyperparameter values (floats); those named in ``seeds`` are
            differentiated (made 0-d tensors of the parameters' dtype here).
        z (sequence of Tensor or None): :math:`Z_t`, ``z[i]`` of shape ``(N, *params[i].shape)``;
            ``None``: :math:`Z_t = 0` (the one-step tangent of a fixed state).
        hz (sequence of Tensor or None): :math:`H_t Z_t`, the tangent of the gradients, shaped
            like ``z``; ``None``: 0.
        buffer_tangents (dict): :math:`S_t` by buffer name, shaped like ``z``; ``None`` where the
            buffer is ``None`` (and allowed, meaning 0, where it is not).
        seeds (dict of Tensor): per differentiated hyperparameter, its column seeds, shape
            ``(N,)``: :math:`\partial x / \partial \lambda_j` for each column ``j``.
        counts (sequence of float, optional): the step numbers, for rules that use them.
        generic (bool, optional): autograd even where the rule has a closed form (the
            reference the closed forms are tested against; default: False).
        **options: the rule's static options.

    Returns:
        ``(z_next, buffer_tangents_next)``: :math:`Z_{t+1}` and :math:`S_{t+1}` (``None`` where
        the new buffer is ``None``).

    Example:
        >>> from hyperoptim.rules import SGD
        >>> w, g = [torch.ones(2)], [torch.ones(2)]
        >>> zn, _ = rule_tangents(SGD, w, g, {"momentum_buffer": [None]},
        ...                       dict(lr=0.1, momentum=0.0, weight_decay=0.0),
        ...                       [torch.zeros(1, 2)], [torch.zeros(1, 2)],
        ...                       {"momentum_buffer": [None]}, {"lr": torch.ones(1)})
        >>> zn[0]  # d w_1 / d lr = -g
        tensor([[-1., -1.]])
    """
    core = _rule_tangents if generic or rule.tangents is None else _closed_tangents
    # A closed form costs a few operations per parameter, and splitting several columns back
    # out of one flat vector copies every output: with few parameters and several columns it
    # runs per parameter (a 4-tensor MLP, 6 columns of Adam: 0.7 ms against 1.1 ms flat).
    few = core is _closed_tangents and len(params) <= _FEW_PARAMS and _n_cols(z, hz, seeds) > 1
    if rule.elementwise and len(params) > 1 and not few and not any(
            isinstance(v, (list, tuple)) for v in hypers.values()):
        chunks = _chunks(rule, params, buffers, counts)
        if len(chunks) < len(params):
            return _flat_tangents(core, rule, chunks, params, grads, buffers, hypers, z, hz,
                                  buffer_tangents, seeds, counts, options)
    return core(rule, params, grads, buffers, hypers, z, hz, buffer_tangents, seeds, counts,
                options)


_FEW_PARAMS = 8
"""Up to this many parameters a closed form with several columns is not flattened."""


def _closed_tangents(rule: UpdateRule, params: Sequence[Tensor], grads: Sequence[Tensor],
                     buffers: Buffers, hypers: dict[str, Hyper], z: Sequence[Tensor] | None,
                     hz: Sequence[Tensor] | None, buffer_tangents: Buffers,
                     seeds: dict[str, Tensor], counts: Sequence[float] | None,
                     options: dict[str, Any]) -> tuple[list[Tensor], Buffers]:
    """:func:`rule_tangents` by the rule's own closed form (:attr:`UpdateRule.tangents`)."""
    assert rule.tangents is not None
    return rule.tangents(params, grads, buffers, hypers, z, hz, buffer_tangents, seeds, counts,
                         **options)


def _chunks(rule: UpdateRule, params: Sequence[Tensor], buffers: Buffers,
            counts: Sequence[float] | None) -> list[list[int]]:
    """The parameters an elementwise rule may step as one vector: same dtype, device, step
    count and buffers present (indices, in order of first appearance)."""
    out: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(params):
        key = (p.dtype, p.device, None if counts is None else counts[i],
               tuple(buffers[name][i] is None for name in rule.buffer_names))
        out.setdefault(key, []).append(i)
    return list(out.values())


def _flat(ts: Sequence[Tensor], idx: list[int]) -> Tensor:
    """The tensors ``ts[i]``, ``i`` in ``idx``, as one flat vector."""
    if len(idx) == 1:
        return ts[idx[0]].reshape(-1)
    joined = _side_by_side([ts[i] for i in idx], 1)
    return torch.cat([ts[i].reshape(-1) for i in idx]) if joined is None else joined.reshape(-1)


def _side_by_side(ts: Sequence[Tensor], n_cols: int) -> Tensor | None:
    """``ts`` as one ``(1, numel)`` view of the storage they share, without a copy, where they
    already lie in it back to back (the tangents a flat step stored: :func:`_split_into` keeps
    one column as views of its output), else ``None``.

    The view holds the same values in the same layout as their concatenation, so the flat step
    computes the same numbers; it saves a copy of each such input (under FSDP2 a whole shard per
    tangent, at the step's memory peak). Not for several columns (stored as separate copies),
    nor for tensors autograd tracks (the view would differentiate through the first alone) or
    that are not plain tensors.
    """
    first = ts[0]
    if n_cols != 1 or any(type(t) is not Tensor or t.requires_grad for t in ts):
        return None
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in ts:
        if (t.dtype != first.dtype or t.device != first.device or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset):
            return None
        offset += t.numel()
    total = offset - first.storage_offset()
    return first.as_strided((1, total), (total, 1), first.storage_offset())


def _flat_cols(ts: Sequence[Tensor | None] | None, idx: list[int], n_cols: int,
               params: Sequence[Tensor]) -> Tensor | None:
    """The tangents ``ts[i]``, ``i`` in ``idx``, as one ``(N, numel)`` matrix (a ``None`` entry
    as zeros; ``None`` if every entry is, or ``ts`` is)."""
    if ts is None or all(ts[i] is None for i in idx):
        return None
    if len(idx) > 1 and all(ts[i] is not None for i in idx):
        joined = _side_by_side([ts[i] for i in idx], n_cols)  # type: ignore[misc]
        if joined is not None:
            return joined
    parts = [params[i].new_zeros((n_cols, params[i].numel())) if ts[i] is None
             else ts[i].reshape(n_cols, params[i].numel()) for i in idx]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _per_chunk(names: Sequence[str], buffers: Buffers, source: Buffers, chunks: list[list[int]],
               flatten: Callable[[Sequence[Any], list[int]], Tensor | None]) -> Buffers:
    """``source`` (the buffers or their tangents) flattened per chunk, ``None`` where the chunk
    has no such buffer (its parameters agree on which buffers exist: :func:`_chunks`)."""
    return {name: [None if buffers[name][idx[0]] is None else flatten(source[name], idx)
                   for idx in chunks] for name in names}


def _split_into(t: Tensor, idx: list[int], params: Sequence[Tensor], n_cols: int,
                out: list[Tensor | None]) -> None:
    """A chunk's ``(N, numel)`` tangent split back into ``out[i]`` shaped ``(N, *params[i].shape)``,
    ``i`` in ``idx``."""
    pieces = t.split([params[i].numel() for i in idx], dim=1)
    for i, piece in zip(idx, pieces):
        piece = piece.reshape(n_cols, *params[i].shape)
        # One column is contiguous already; several are copied out of the shared layout.
        out[i] = piece if piece.is_contiguous() else piece.contiguous()


def _flat_tangents(core: Callable[..., tuple[list[Tensor], Buffers]], rule: UpdateRule,
                   chunks: list[list[int]], params: Sequence[Tensor],
                   grads: Sequence[Tensor], buffers: Buffers, hypers: dict[str, Hyper],
                   z: Sequence[Tensor] | None, hz: Sequence[Tensor] | None,
                   buffer_tangents: Buffers, seeds: dict[str, Tensor],
                   counts: Sequence[float] | None,
                   options: dict[str, Any]) -> tuple[list[Tensor], Buffers]:
    """:func:`rule_tangents` with each chunk of parameters concatenated into one vector (the
    primal state flat, the tangents ``(N, numel)``), then split back into shapes; ``core`` is
    the generic path or the rule's closed form."""
    names = rule.buffer_names
    n_cols = _n_cols(z, hz, seeds)

    def cols(ts: Sequence[Tensor | None] | None, idx: list[int]) -> Tensor | None:
        return _flat_cols(ts, idx, n_cols, params)

    def all_cols(ts: Sequence[Tensor] | None) -> list[Tensor] | None:
        return None if ts is None else [cols(ts, idx) for idx in chunks]  # type: ignore[misc]

    zn, sn = core(
        rule, [_flat(params, idx) for idx in chunks], [_flat(grads, idx) for idx in chunks],
        _per_chunk(names, buffers, buffers, chunks, _flat), hypers,
        all_cols(z), all_cols(hz),
        _per_chunk(names, buffers, buffer_tangents, chunks, cols), seeds,
        None if counts is None else [counts[idx[0]] for idx in chunks], options)
    z_next: list[Tensor | None] = [None] * len(params)
    s_next: Buffers = {name: [None] * len(params) for name in names}
    for c, idx in enumerate(chunks):
        _split_into(zn[c], idx, params, n_cols, z_next)
        for name in names:
            if sn[name][c] is not None:
                _split_into(sn[name][c], idx, params, n_cols, s_next[name])
    return z_next, s_next  # type: ignore[return-value]


def _dtype_device(params: Sequence[Tensor]) -> tuple[torch.dtype, torch.device | None]:
    """The dtype and device of the 0-d hyperparameter tensors (the parameters')."""
    if not params:
        return torch.get_default_dtype(), None
    return params[0].dtype, params[0].device


def _double_vjp(outs: Sequence[Tensor], inputs: Sequence[Tensor], tangents: Sequence[Tensor],
                n_cols: int) -> tuple[list[int], list[list[Tensor | None]]]:
    """The Jacobian-vector products of ``outs`` along each column of ``tangents`` by two reverse
    passes: which outputs carry a graph, and per column the product for each of those."""
    live = [k for k, o in enumerate(outs) if o.requires_grad]
    # u -> J^T u is linear in the dummy cotangent u; its vjp along T is J T.
    us = [torch.zeros_like(outs[k], requires_grad=True) for k in live]
    pulled = torch.autograd.grad([outs[k] for k in live], inputs, us, create_graph=True,
                                 allow_unused=True) if live else [None] * len(inputs)
    pairs = [(v, t) for v, t in zip(pulled, tangents) if v is not None and v.requires_grad]
    if not pairs:
        return live, [[None] * len(us) for _ in range(n_cols)]
    return live, [list(torch.autograd.grad([v for v, _ in pairs], us, [t[j] for _, t in pairs],
                                           retain_graph=j < n_cols - 1, allow_unused=True))
                  for j in range(n_cols)]


def _stack_columns(outs: Sequence[Tensor], live: list[int], columns: list[list[Tensor | None]],
                   n_cols: int) -> list[Tensor]:
    """Per output, its columns stacked ``(N, *shape)`` (zeros where it has no graph or a
    column did not reach it)."""
    position = {k: pos for pos, k in enumerate(live)}
    out: list[Tensor] = []
    for k, o in enumerate(outs):
        pos = position.get(k)
        cols = [None if pos is None else col[pos] for col in columns]
        if n_cols != 1:
            out.append(torch.stack([torch.zeros_like(o) if c is None else c for c in cols]))
        else:
            out.append((torch.zeros_like(o) if cols[0] is None else cols[0]).unsqueeze(0))
    return out


def _rule_tangents(rule: UpdateRule, params: Sequence[Tensor], grads: Sequence[Tensor],
                   buffers: Buffers, hypers: dict[str, Hyper], z: Sequence[Tensor] | None,
                   hz: Sequence[Tensor] | None, buffer_tangents: Buffers,
                   seeds: dict[str, Tensor], counts: Sequence[float] | None,
                   options: dict[str, Any]) -> tuple[list[Tensor], Buffers]:
    """:func:`rule_tangents` over lists of parameters (any rule), by two reverse passes."""
    names = rule.buffer_names
    n = len(params)
    n_cols = _n_cols(z, hz, seeds)
    if z is None:
        z = [p.new_zeros((n_cols, *p.shape)) for p in params]
    if hz is None:
        hz = [p.new_zeros((n_cols, *p.shape)) for p in params]
    where, flat_bufs = _pack(buffers, names)
    flat_tans = [buffer_tangents[names[k]][i] if buffer_tangents[names[k]][i] is not None
                 else z[i].new_zeros(z[i].shape) for k, i in where]
    seeded = list(seeds)
    dtype, device = _dtype_device(params)
    with torch.enable_grad():
        ps = [p.detach().requires_grad_() for p in params]
        gs = [g.detach().requires_grad_() for g in grads]
        bs = [b.detach().requires_grad_() for b in flat_bufs]
        hs = [torch.tensor(float(hypers[k]), dtype=dtype, device=device, requires_grad=True)
              for k in seeded]
        full = dict(hypers, **dict(zip(seeded, hs)))
        new_p, new_b = rule.step(ps, gs, _unpack(where, bs, names, n), full, counts, **options)
        out_where, flat_new_b = _pack(new_b, names)
        outs = list(new_p) + list(flat_new_b)
        tangents = list(z) + list(hz) + flat_tans + [seeds[k].to(dtype) for k in seeded]
        live, columns = _double_vjp(outs, ps + gs + bs + hs, tangents, n_cols)
    out_tangents = _stack_columns(outs, live, columns, n_cols)
    return out_tangents[:n], _unpack(out_where, out_tangents[n:], names, n)


def rule_vjp(
    rule: UpdateRule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Buffers,
    hypers: dict[str, Hyper],
    *,
    wrt: Sequence[str] = ("lr",),
    counts: Sequence[float] | None = None,
    generic: bool = False,
    **options: Any,
) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], tuple[list[Tensor], list[Tensor],
                                                          dict[str, Tensor]]]]:
    r"""The new weights :math:`u(\lambda, w, g) = w_{t+1}` of one step, and its vector-Jacobian
    product by ``torch.func.vjp``, with the buffers *detached* (constants of the product).

    This is what the implicit method (Clarke et al. 2022, Eq. 11 for Adam) differentiates:
    for a cotangent :math:`q` (shaped like the weights) the product returns
    :math:`((\partial u / \partial w)^\top q,\ (\partial u / \partial g)^\top q,\
    (\partial u / \partial \lambda)^\top q)`; the total :math:`w`-derivative through
    :math:`g(w)` is the first plus :math:`H` (``SecondOrder.hvp``) times the second.

    An ``elementwise`` rule with a closed form (:attr:`UpdateRule.tangents`) gets the product
    from it instead: its weight and gradient Jacobians are diagonal (:func:`rule_diagonals`),
    so the first two are elementwise products, and each hyperparameter's is the sum of ``q``
    times its tangent column. The closed form's columns are taken once, here; each product is
    then a few multiplications.

    Args:
        rule (UpdateRule): the rule.
        params, grads, buffers: the state before the step (buffers are not differentiated).
        hypers (dict): hyperparameter values (floats or 0-d tensors).
        wrt (sequence of str, optional): the hyperparameters to differentiate (default: lr).
        counts (sequence of float, optional): the step numbers, for rules that use them.
        generic (bool, optional): ``torch.func.vjp`` even where the rule has a closed form
            (the reference; default: False).
        **options: the rule's static options.

    Returns:
        ``(new_params, vjp_fn)``; ``vjp_fn(q)`` returns ``(dw, dg, dhypers)`` with ``dhypers`` a
        dict of 0-d tensors keyed by ``wrt``.

    Example:
        >>> from hyperoptim.rules import SGD
        >>> w, g = [torch.ones(2)], [torch.full((2,), 3.0)]
        >>> new_w, vjp_fn = rule_vjp(SGD, w, g, {"momentum_buffer": [None]},
        ...                          dict(lr=0.1, momentum=0.0, weight_decay=0.0))
        >>> dw, dg, dh = vjp_fn([torch.ones(2)])
        >>> dw[0], dg[0], dh["lr"]  # u = w - a g
        (tensor([1., 1.]), tensor([-0.1000, -0.1000]), tensor(-6.))
    """
    names = rule.buffer_names
    fixed = {name: [None if b is None else b.detach() for b in buffers[name]] for name in names}
    wrt = list(wrt)
    dtype, device = _dtype_device(params)
    hyper_primals = tuple(
        hypers[k].detach() if isinstance(hypers[k], Tensor)
        else torch.tensor(float(hypers[k]), dtype=dtype, device=device) for k in wrt)

    def update(ps, gs, hs):
        full = dict(hypers, **dict(zip(wrt, hs)))
        new_p, _ = rule.step(list(ps), list(gs), fixed, full, counts, **options)
        return tuple(new_p)

    if not generic and rule.tangents is not None and rule.elementwise and not any(
            isinstance(v, (list, tuple)) for v in hypers.values()):
        full = dict(hypers, **dict(zip(wrt, hyper_primals)))
        return _closed_vjp(rule, [p.detach() for p in params], [g.detach() for g in grads],
                           fixed, full, wrt, counts, options)
    new_params, pullback = torch.func.vjp(update, tuple(p.detach() for p in params),
                                          tuple(g.detach() for g in grads), hyper_primals)

    def vjp_fn(q: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        dw, dg, dh = pullback(tuple(q))
        return list(dw), list(dg), dict(zip(wrt, dh))

    return list(new_params), vjp_fn


def _closed_vjp(rule: UpdateRule, params: list[Tensor], grads: list[Tensor], buffers: Buffers,
                hypers: dict[str, Hyper], wrt: list[str], counts: Sequence[float] | None,
                options: dict[str, Any]
                ) -> tuple[list[Tensor], Callable[[Sequence[Tensor]],
                                                  tuple[list[Tensor], list[Tensor], dict[str, Tensor]]]]:
    """:func:`rule_vjp` from the rule's closed-form tangents: columns 0 and 1 the diagonals of
    the weight and gradient Jacobians, then one column per hyperparameter in ``wrt``."""
    n_cols = 2 + len(wrt)
    with torch.no_grad():
        new_params, _ = rule.step(params, grads, buffers, hypers, counts, **options)
        eye = torch.eye(n_cols, dtype=params[0].dtype, device=params[0].device)
        cols, _ = rule_tangents(rule, params, grads, buffers, _plain(hypers),
                                _unit(params, 0, n_cols), _unit(params, 1, n_cols),
                                {name: [None] * len(params) for name in rule.buffer_names},
                                {k: eye[2 + j] for j, k in enumerate(wrt)}, counts=counts,
                                **options)

    def vjp_fn(q: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        dw = [qi * c[0] for qi, c in zip(q, cols)]
        dg = [qi * c[1] for qi, c in zip(q, cols)]
        dh = {k: torch.stack([(qi * c[2 + j]).sum() for qi, c in zip(q, cols)]).sum()
              for j, k in enumerate(wrt)}
        return dw, dg, dh

    return list(new_params), vjp_fn


def _unit(params: Sequence[Tensor], j: int, n_cols: int) -> list[Tensor]:
    """Per parameter an ``(n_cols, *shape)`` tangent of ones in column ``j``, zeros elsewhere."""
    out = []
    for p in params:
        t = p.new_zeros((n_cols, *p.shape))
        t[j] = 1.0
        out.append(t)
    return out


def _plain(hypers: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters with every tensor detached (per-parameter lists included)."""
    return {k: [x.detach() for x in v] if isinstance(v, (list, tuple))
            else v.detach() if isinstance(v, Tensor) else v for k, v in hypers.items()}


def rule_diagonals(rule: UpdateRule, params: Sequence[Tensor], grads: Sequence[Tensor],
                   buffers: Buffers, hypers: dict[str, Any], counts: Sequence[float] | None = None,
                   **options: Any) -> tuple[list[Tensor], list[Tensor]]:
    r"""The diagonals of :math:`\partial w' / \partial w` and :math:`\partial w' / \partial g` of
    an ``elementwise`` rule with its buffers held constant, shaped like the weights.

    Those Jacobians are diagonal, so their vector-Jacobian products are elementwise products with
    these: what the implicit method's Neumann series applies at every term (:func:`rule_vjp`
    gives the same products). From the rule's closed form where it has one
    (:func:`rule_tangents` with the two columns :math:`(Z, HZ) = (1, 0)` and :math:`(0, 1)`).
    ``hypers`` may hold floats, tensors (detached here) or per-parameter lists.

    Example:
        >>> from hyperoptim.rules import SGD
        >>> dw, dg = rule_diagonals(SGD, [torch.ones(2)], [torch.ones(2)], {"momentum_buffer": [None]},
        ...                         dict(lr=0.1, momentum=0.0, weight_decay=0.5))
        >>> dw[0], dg[0]  # w' = w - a (g + c w)
        (tensor([0.9500, 0.9500]), tensor([-0.1000, -0.1000]))
    """
    if not rule.elementwise:
        raise ValueError(f"Invalid rule value: {rule.name!r} is not elementwise (its Jacobians "
                         "are not diagonal)")
    with torch.no_grad():
        cols, _ = rule_tangents(rule, [p.detach() for p in params], [g.detach() for g in grads],
                                buffers, _plain(hypers), _unit(params, 0, 2), _unit(params, 1, 2),
                                {name: [None] * len(params) for name in rule.buffer_names}, {},
                                counts=counts, **options)
    return [c[0] for c in cols], [c[1] for c in cols]
