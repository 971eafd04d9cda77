r"""The signatures the public classes show, built one way.

A method's keyword options are declared once, as the keyword-only parameters of a function with
an empty body (:func:`declared`); a public class's ``__init__(..., **options)`` shows them in
place of ``**options`` (:func:`with_keywords`), refuses a keyword its signature lacks with
Python's own ``TypeError`` (:func:`refuse_unexpected`) and completes what it was given with the
declared defaults (:func:`bind_keywords`). Keywords renamed in this release keep their old names
for one release (:func:`renamed_keywords`). The AdamW classes take their Adam class's signature
with ``torch.optim.AdamW``'s changes (:func:`adamw_signature`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from .options import renamed_group

__all__ = [
    "adamw_signature", "bind_keywords", "declared", "refuse_unexpected", "renamed_keywords",
    "with_defaults", "with_keywords",
]

_F = TypeVar("_F", bound=Callable[..., Any])


def declared(declaration: Callable[..., Any]) -> tuple[inspect.Parameter, ...]:
    """The keyword-only parameters of ``declaration``, a function with an empty body."""
    params = inspect.signature(declaration).parameters.values()
    return tuple(p for p in params if p.kind is p.KEYWORD_ONLY)


def with_defaults(keywords: Iterable[inspect.Parameter], **defaults: Any
                  ) -> tuple[inspect.Parameter, ...]:
    """``keywords`` with ``defaults`` replacing theirs (a class whose default differs, e.g.
    MARTHE's hyper-step size over Adam)."""
    return tuple(p.replace(default=defaults[p.name]) if p.name in defaults else p
                 for p in keywords)


def with_keywords(keywords: Iterable[inspect.Parameter]) -> Callable[[_F], _F]:
    """A decorator giving ``init``, a public class's ``__init__(..., **options)``, the signature its
    users see (``inspect.signature``, ``help``, the docs): its own parameters, then ``keywords``
    (those it does not name itself) in place of ``**options``."""
    tail = tuple(keywords)

    def decorate(init: _F) -> _F:
        own = inspect.signature(init)
        head = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        names = {p.name for p in head}
        init.__signature__ = own.replace(  # type: ignore[attr-defined]
            parameters=[*head, *(p for p in tail if p.name not in names)])
        return init

    return decorate


def adamw_signature(adam_init: Callable[..., Any]) -> Callable[[_F], _F]:
    """A decorator giving an AdamW class's ``__init__(..., weight_decay=1e-2, ...,
    **options)`` its Adam class's keyword options but ``decoupled_weight_decay`` (always on), as
    ``torch.optim.AdamW`` has ``torch.optim.Adam``'s."""
    return with_keywords(p for p in inspect.signature(adam_init).parameters.values()
                         if p.kind is p.KEYWORD_ONLY and p.name != "decoupled_weight_decay")


def refuse_unexpected(init: Callable[..., Any], given: Mapping[str, Any]) -> None:
    """The TypeError Python raises for a keyword that ``init``'s public signature lacks: its
    ``**options`` stands for an explicit list, and refuses what the list would."""
    names = inspect.signature(init).parameters
    for key in given:
        if key not in names:
            raise TypeError(f"{init.__qualname__}() got an unexpected keyword argument {key!r}")


def bind_keywords(init: Callable[..., Any], given: Mapping[str, Any],
                  keywords: Iterable[inspect.Parameter]) -> dict[str, Any]:
    """``given``, the keywords ``init`` took as ``**options``, checked against its public signature
    and completed with the defaults that signature shows for ``keywords``."""
    refuse_unexpected(init, given)
    shown = inspect.signature(init).parameters
    return {p.name: given.get(p.name, shown[p.name].default) for p in keywords}


def renamed_keywords(renames: Mapping[str, str]) -> Callable[[_F], _F]:
    """A decorator for a public class's ``__init__``: its keywords' old names (``renames``: old ->
    new, :func:`~hyperoptim.core.options.renamed_options`) are accepted with a
    ``DeprecationWarning`` naming the new one; both names at once raise ``ValueError``. The
    signature shown is the new one."""

    def decorate(init: _F) -> _F:
        @functools.wraps(init)
        def accept_old_names(self: Any, *args: Any, **kwargs: Any) -> None:
            kwargs = renamed_group(type(self).__name__, kwargs, renames, where=" as a keyword")
            init(self, *args, **kwargs)

        return accept_old_names  # type: ignore[return-value]

    return decorate
