r"""Progress bars for long computations: tqdm on stderr when it is a terminal, nothing otherwise.

:func:`progress_bar` returns a tqdm bar when :class:`gpntk.settings.progress` is on, ``sys.stderr``
is a terminal and tqdm is installed (the ``progress`` extra), and a bar that does nothing
otherwise; :func:`track` wraps an iterable in one. Bars appear only after
:data:`gpntk.settings.PROGRESS_DELAY` seconds (tqdm's ``delay``), so short computations print
nothing, and are removed when done (``leave=False``) unless asked to stay. Nothing here changes
a result. Importing this module imports neither torch nor tqdm.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator, Protocol, TypeVar

from . import settings

__all__ = ["ProgressBar", "progress_bar", "track", "bars_shown"]

_T = TypeVar("_T")


class ProgressBar(Protocol):
    """What gpntk uses of a tqdm bar."""

    def update(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: Any) -> Any: ...


class _NoBar:
    """The bar drawn when none is shown: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def bars_shown() -> bool:
    """Whether bars are drawn now: the setting is on, stderr is a terminal and tqdm is installed."""
    if not settings.progress.on():
        return False
    stream = sys.stderr
    try:
        if stream is None or not stream.isatty():
            return False
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def progress_bar(
    total: int | None, desc: str, unit: str = "it", *, min_total: int = 2, leave: bool = False
) -> ProgressBar:
    """A progress bar for ``total`` steps (``None``: unknown), or one that does nothing.

    Nothing is drawn (see the module docstring) when bars are off, stderr is no terminal, tqdm
    is missing or ``total < min_total`` (a computation of one step shows no progress). Use it as
    a context manager, or call ``close()``; ``update(n)`` after each ``n`` steps.
    """
    if (total is not None and total < min_total) or not bars_shown():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, leave=leave, delay=settings.PROGRESS_DELAY, file=sys.stderr,
        dynamic_ncols=True,
    )


def track(
    items: Iterable[_T], desc: str, total: int | None = None, unit: str = "it", *, min_total: int = 2,
    leave: bool = False,
) -> Iterator[_T]:
    """The items of ``items``, with a progress bar (:func:`progress_bar`) advanced after each one.

    ``total`` defaults to ``len(items)`` where ``items`` has a length.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]  # checked just above
    bar = progress_bar(total, desc, unit, min_total=min_total, leave=leave)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
