"""Errors a user can fix: each carries one line naming the culprit and the fix.

The command-line entry points catch :class:`SemiSegError`, print its message on one line and exit with
code 2 (``EXIT_USER_ERROR``); ``HYDRA_FULL_ERROR=1`` re-raises it with its stack trace instead.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable
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


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a :class:`ConfigError` naming ``key`` (the full config key,
    e.g. ``method.mixing``) and the choices."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} must be one of {choices}")
    return value


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


def one_line(error: BaseException) -> str:
    """The error's message on one line. An error raised in a DataLoader worker comes back re-raised with the
    worker's traceback in its message ("Caught DataError in DataLoader worker process 0. Original Traceback
    ..."); its last line holds the original message after the exception's name."""
    message = str(error)
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        message = last.split(": ", 1)[1] if last.split(": ", 1)[0].rsplit(".", 1)[-1].endswith("Error") else last
    return " ".join(message.split("\n"))


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
            print(f"error: {one_line(user_error)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]


PATH_KEYS = ("ckpt", "ckpt_path", "split_file", "input_dir", "root", "dir")
PATH_KEY_SUFFIXES = ("_dir", "_file", "_path")
OVERRIDE = re.compile(r"^(?P<key>\+{0,2}[\w.@/-]+)=(?P<value>.*)$", re.DOTALL)


def quote_path_overrides(args: list[str]) -> list[str]:
    """Command-line overrides with path values that hold ``=`` (``ckpt=.../seed=0/last.ckpt``, as a sweep names
    its job folders) quoted for Hydra, whose grammar rejects an unquoted ``=`` in a value; other arguments
    as they are. Values with an interpolation (``${...}``) or already quoted are left alone."""
    quoted = []
    for arg in args:
        match = OVERRIDE.match(arg)
        if match is not None:
            key, value = match["key"], match["value"]
            last = key.lstrip("+").rsplit(".", 1)[-1]
            is_path = last in PATH_KEYS or last.endswith(PATH_KEY_SUFFIXES)
            if is_path and "=" in value and "${" not in value and value[:1] not in ("'", '"'):
                quote = "'" if "'" not in value else '"'
                if quote not in value:
                    arg = f"{key}={quote}{value}{quote}"
        quoted.append(arg)
    return quoted


def run_hydra_app(app: Callable[[], Any], started: Callable[[], bool]) -> None:
    """Call a ``@hydra.main`` app so that Hydra's own errors exit with code 2 like ours.

    Hydra reports an unknown config group option or a mistyped key itself (the message names the key and
    lists the options) and exits with code 1 before the task function runs; ``started()`` tells whether it ran.
    Path values holding ``=`` need no quoting (:func:`quote_path_overrides`).
    """
    from semiseg.console import silence_unactionable  # lazily: it imports Lightning

    silence_unactionable()
    sys.argv = [sys.argv[0], *quote_path_overrides(sys.argv[1:])]
    try:
        app()
    except SystemExit as done:
        if done.code == 1 and not started():
            raise SystemExit(EXIT_USER_ERROR) from None
        raise
