"""Finished work is a directory whose result file exists: written atomically and last, it
marks the work done, so a repeated command reads it and an interrupted one continues from
the stage checkpoints beside it.

The config the work was made with is claimed first; the same directory with another config
is refused rather than silently mixed. Whether a claim already there is the same config is the
caller's to say (``same``): a claim written before a config key was added lacks that key, and
is still the same config when the key sits at its default.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rapc.errors import RapcError
from rapc.rundir import atomic_write, writable_dir

CONFIG_FILE = "study-config.yaml"


def cached(directory: Path, result_file: str, config: str, build: Callable[[Path], dict[str, Any]],
           same: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """The result of ``build(directory)``: read from ``directory/result_file``, or computed now and
    written there; ``same(claim)`` says whether a claim found there is ``config``'s (default: the same text)."""
    directory = writable_dir(directory)
    claimed = directory / CONFIG_FILE
    if claimed.is_file() and not (same or config.__eq__)(claimed.read_text()):
        raise RapcError(f"{directory} holds study work made with another config (or another rapc's row recipes); "
                        "choose another --out for this one")
    done = directory / result_file
    if done.is_file():
        return json.loads(done.read_text())
    atomic_write(claimed, lambda tmp: tmp.write_text(config))
    result = build(directory)
    write_json(done, result)
    return result


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))
