"""The wheel that `pip install rapc` gets: every package and module under rapc/, found by walking the
source, the presets as rapc.configs, the console script, and nothing else.

The wheel installed and run end to end outside the tree is `make wheel-check` (scripts/wheel_check.py),
which `make test` runs after pytest.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from wheeltools import build_wheel  # noqa: E402


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    return zipfile.ZipFile(build_wheel(tmp_path_factory.mktemp("dist")))


def _source_packages() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "rapc").rglob("__init__.py") if "__pycache__" not in p.parts)


def test_the_source_walk_finds_the_subpackages():
    names = {str(p.relative_to(ROOT)) for p in _source_packages()}
    assert {"rapc", "rapc/pipeline", "rapc/export", "rapc/bench", "rapc/study"} <= names


def test_wheel_holds_every_package_and_module_under_rapc(wheel):
    in_wheel = set(wheel.namelist())
    modules = [str(m.relative_to(ROOT)) for package in _source_packages() for m in package.glob("*.py")]
    missing = [m for m in modules if m not in in_wheel]
    assert not missing, f"not in the wheel: {missing}"


def test_wheel_holds_the_presets_as_rapc_configs(wheel):
    presets = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert "digits-lenet-filter.yaml" in presets
    in_wheel = set(wheel.namelist())
    assert "rapc/configs/__init__.py" in in_wheel
    assert [n for n in presets if f"rapc/configs/{n}" not in in_wheel] == []


def test_wheel_installs_the_rapc_console_script(wheel):
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "rapc = rapc.cli:main" in wheel.read(entry_points).decode()


def test_wheel_holds_nothing_but_rapc(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"rapc"}


def test_wheel_admits_the_gpu_machines_torch_and_the_tested_pair(wheel):
    from packaging.requirements import Requirement

    metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    requires = {(r := Requirement(line.split(":", 1)[1].strip())).name: r
                for line in wheel.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")}
    for name, versions in {"torch": ("2.11.0", "2.14.1"), "torchvision": ("0.26.0", "0.29.1"), "onnxruntime": ("1.30.0", "1.32.0")}.items():
        for version in versions:
            assert requires[name].specifier.contains(version), f"{requires[name]} refuses {name} {version}"
    assert not requires["torch"].specifier.contains("2.15.0")  # never a torch that was not run
