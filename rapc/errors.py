"""The one exception type a user can cause, and the lazy import of optional dependencies."""

from __future__ import annotations

import importlib
from types import ModuleType


class RapcError(Exception):
    """A mistake the user can fix (bad config, missing file, wrong shape).

    The CLI prints the message on one line and exits with code 2; anything else
    that escapes is a bug and keeps its traceback.
    """


def require(module: str, install: str) -> ModuleType:
    """Import an optional dependency, or say in one line what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RapcError(f"{module} is not installed ({exc}); install it with `{install}`") from None
