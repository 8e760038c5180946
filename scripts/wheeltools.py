"""Build rapc's wheel and install it into a fresh virtual environment, outside the source tree.

Shared by `make wheel-check`, `make gpu-wheels`, `make gpu-check` and their tests. Standard
library only: on the GPU machine it runs before rapc (or anything rapc needs) is installed.

A fresh environment reuses an existing one's packages (torch alone is 5 GB) through a
``.pth`` file holding that environment's site-packages paths. A path line in a ``.pth`` adds
the folder to ``sys.path`` but does not process the ``.pth`` files inside it, so an editable
install of rapc there (``__editable__...pth``) stays invisible: ``import rapc`` finds the
installed wheel or nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent

# What the build reads; copied to a scratch folder so that a stale build/ in the tree (setuptools
# keeps deleted modules there) can never reach the wheel, and the build writes nothing here.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "rapc", "configs")

BASE_PTH = "_rapc_base_env.pth"


LOG_FILE: TextIO | None = None  # gpu_check sets it: everything printed here is also written there


def log(message: str) -> None:
    print(message, flush=True)
    if LOG_FILE is not None:
        LOG_FILE.write(message + "\n")
        LOG_FILE.flush()


@dataclass
class Ran:
    returncode: int
    output: str
    seconds: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float | None = None,
        check: bool = True, capture: bool = False) -> Ran:
    """Run ``cmd``, echoing it, its output (unless ``capture``) and its wall time. Past ``timeout``
    seconds it is killed with its children (torch.compile's workers)."""
    shown = " ".join("'<script>'" if "\n" in a else a for a in cmd)
    log(f"$ {shown}" + (f"   (in {cwd})" if cwd else ""))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill) if timeout is not None else None
    if timer:
        timer.start()
    lines = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if not capture:
                log(line.rstrip("\n"))
        proc.wait()
    except BaseException:
        kill()
        raise
    finally:
        if timer:
            timer.cancel()
    ran = Ran(proc.returncode, "".join(lines), time.perf_counter() - start, expired.is_set())
    log(f"  -> {'killed after' if ran.timed_out else f'exit {ran.returncode} in'} {ran.seconds:.1f} s")
    if check and not ran.ok:
        if capture:
            log(ran.output)
        raise SystemExit(f"failed: {shown}")
    return ran


def build_wheel(dest: Path, python: str = sys.executable, source: Path = ROOT) -> Path:
    """rapc's wheel in ``dest``, built from a scratch copy of the source without build isolation
    (setuptools comes from ``python``'s environment: no network needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rapc-build-") as scratch:
        for name in BUILD_INPUTS:
            src = source / name
            if src.is_dir():
                shutil.copytree(src, Path(scratch) / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, Path(scratch) / name)
        run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dest), scratch])
    wheels = sorted(dest.glob("rapc-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise SystemExit(f"pip wheel wrote no rapc wheel into {dest}")
    return wheels[-1]


_SITE_DIRS = """
import json, sys, sysconfig
from pathlib import Path
std = [Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")]
def wanted(p):
    q = Path(p).resolve()
    if not p or not q.is_dir() or q == Path(sys.argv[1]).resolve():
        return False
    return not any(q.is_relative_to(s) for s in std) or "site-packages" in q.parts or "dist-packages" in q.parts
print(json.dumps([p for p in dict.fromkeys(sys.path) if wanted(p)]))
"""


def site_dirs(python: str) -> list[str]:
    """The folders ``python`` imports installed packages from: its site-packages and whatever its
    ``.pth`` files add; not the standard library, nor the source tree's root (its rapc/)."""
    out = subprocess.run([python, "-I", "-c", _SITE_DIRS, str(ROOT)], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def fresh_venv(path: Path, base_python: str, *, system_site_packages: bool = False) -> Path:
    """A new virtual environment at ``path`` that also sees ``base_python``'s packages; returns its python.

    ``--system-site-packages`` alone is not enough where ``base_python`` is itself a venv (as on
    the GPU machines): a venv made from a venv sees the base interpreter's packages, not the
    venv's. The ``.pth`` covers both cases. No pip is put in: pip comes from the base packages.
    """
    cmd = [base_python, "-m", "venv", "--without-pip", str(path)]
    if system_site_packages:
        cmd.insert(3, "--system-site-packages")
    run(cmd)
    python = path / "bin" / "python"
    own = subprocess.run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    (Path(own) / BASE_PTH).write_text("".join(f"{d}\n" for d in site_dirs(base_python)))
    return python


def clean_env(venv_python: Path) -> dict[str, str]:
    """The environment for commands run from the fresh venv: its bin/ first, no PYTHONPATH or
    user site that could bring the source tree's rapc back."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv_python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONNOUSERSITE"] = "1"
    env["VIRTUAL_ENV"] = str(venv_python.parent.parent)
    return env


def rapc_location(venv_python: Path, cwd: Path) -> str:
    """Where ``import rapc`` (and rapc.study) resolves from the fresh venv, run from ``cwd``."""
    result = run([str(venv_python), "-c", "import rapc, rapc.study; print(rapc.__file__)"], cwd=cwd,
                 env=clean_env(venv_python), capture=True)
    return result.output.strip().splitlines()[-1]


def assert_installed_in(venv_python: Path, cwd: Path) -> str:
    location = rapc_location(venv_python, cwd)
    venv = venv_python.parent.parent.resolve()
    if not Path(location).resolve().is_relative_to(venv):
        raise SystemExit(f"rapc was imported from {location}, not from the fresh environment {venv}")
    log(f"rapc imported from {location}")
    return location
