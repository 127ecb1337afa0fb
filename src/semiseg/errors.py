"""Errors a user can fix: each carries one line naming the culprit and the fix.

The command-line entry points catch :class:`SemiSegError`, print its message on one line and exit with
code 2 (``EXIT_USER_ERROR``); ``HYDRA_FULL_ERROR=1`` re-raises it with its stack trace instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., Any])


class SemiSegError(Exception):
    """Base class of every error caused by input the user can correct."""


class ConfigError(SemiSegError, ValueError):
    """A configuration or command-line value is invalid."""


class DataError(SemiSegError, ValueError):
    """A dataset's files are inconsistent (missing partners, bad sizes, bad mask values)."""


class DatasetNotFoundError(SemiSegError, FileNotFoundError):
    """A dataset root is missing or empty."""

    def __init__(self, name: str, root: os.PathLike | str, layout: str, source: str) -> None:
        super().__init__(
            f"dataset '{name}' not found at {root}: expected layout {layout}. Get it from {source} "
            f"and set SEMISEG_DATA_DIR (or paths.data_dir=...) to the folder that holds it"
        )


def full_error_requested() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR", "") == "1"


def user_error_in(error: BaseException) -> SemiSegError | None:
    """The :class:`SemiSegError` behind ``error`` (Hydra's instantiate wraps errors in its own)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, SemiSegError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def exit_on_user_error(func: F) -> F:
    """Decorate an entry point: a :class:`SemiSegError` becomes one line on stderr and exit code 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as error:
            user_error = user_error_in(error)
            if user_error is None or full_error_requested():
                raise
            print(f"error: {user_error}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]


def run_hydra_app(app: Callable[[], Any], started: Callable[[], bool]) -> None:
    """Call a ``@hydra.main`` app so that Hydra's own errors exit with code 2 like ours.

    Hydra reports an unknown config group option or a mistyped key itself (the message names the key and
    lists the options) and exits with code 1 before the task function runs; ``started()`` tells whether it ran.
    """
    try:
        app()
    except SystemExit as done:
        if done.code == 1 and not started():
            raise SystemExit(EXIT_USER_ERROR) from None
        raise
