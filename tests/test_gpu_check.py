"""`make gpu-wheels` and `make gpu-check` on a CPU machine: the wheel folder's size and completeness,
an install from it with no index into a fresh environment that holds only the GPU machine's
packages, and gpu-check's CPU path (the GPU steps skipped with a reason).

The stand-in for the GPU machine is a folder of links to .venv's installed packages that are on
the GPU image (gpu_wheels.GPU_HAS) and what they need, and nothing else: no rapc, no pydantic, no
torch-pruning, torchattacks or mlxtend. The folder is built from PyPI; without PyPI these tests skip.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))
from gpu_wheels import GPU_HAS, LIMIT_BYTES  # noqa: E402

HERE = f"{sys.version_info.major}.{sys.version_info.minor}"
# What the GPU machines lack and rapc imports (the list): the folder must bring each.
LACKING = {"pydantic", "pydantic-core", "annotated-types", "typing-inspection", "torch-pruning", "torchattacks", "mlxtend"}


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _gpu_wheels(dest: Path, python_version: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_wheels.py"), "--dest", str(dest), "--python-version", python_version],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if not _pypi_reachable():
            pytest.skip("PyPI is unreachable: the wheel folder cannot be built here")
        pytest.fail(f"gpu_wheels.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads((dest / "manifest.json").read_text())


@pytest.fixture(scope="module")
def folder_312(tmp_path_factory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("gpu-wheels-312")
    return dest, _gpu_wheels(dest, "3.12")


@pytest.fixture(scope="module")
def folder_here(tmp_path_factory) -> tuple[Path, dict]:
    """The same folder for this machine's Python, so that it can be installed here."""
    dest = tmp_path_factory.mktemp(f"gpu-wheels-{HERE}")
    return dest, _gpu_wheels(dest, HERE)


@pytest.fixture(scope="module")
def gpu_like_python(tmp_path_factory) -> Path:
    """An interpreter that sees .venv's packages that are on the GPU image, and those they need."""
    dists: dict[str, md.Distribution] = {}
    for dist in md.distributions():  # the one that imports wins: the first on sys.path
        dists.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    keep: set[str] = set()
    todo = [n for n in dists if n in GPU_HAS]
    while todo:
        name = todo.pop()
        if name in keep or name not in dists:
            continue
        keep.add(name)
        for line in dists[name].requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    assert not keep & (LACKING | {"rapc"}), "the stand-in would already hold what the folder must bring"
    packages = tmp_path_factory.mktemp("gpu-image-packages")
    for name in keep:
        site = Path(dists[name].locate_file(""))
        for top in {Path(f).parts[0] for f in dists[name].files or [] if not str(f).startswith("..")}:
            if (site / top).exists() and not (packages / top).exists() and not top.endswith(".pth"):
                (packages / top).symlink_to(site / top)
    image = tmp_path_factory.mktemp("gpu-image")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(image / "venv")], check=True)
    own = subprocess.run([str(image / "venv/bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    (Path(own) / "gpu_image.pth").write_text(f"{packages}\n")
    return image / "venv/bin/python"


def _gpu_check(python: Path, wheels: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), str(SCRIPTS / "gpu_check.py"), "--wheels", str(wheels), "--out", str(out), "--isolated"],
                          capture_output=True, text=True, timeout=600, cwd=out.parent)


def test_gpu_wheels_folder_holds_what_the_gpu_machine_lacks_for_python_3_12_under_32_mib(folder_312):
    dest, manifest = folder_312
    assert LACKING <= set(manifest["packages"])
    wheels = sorted(dest.glob("*.whl"))
    assert {p.name for p in wheels} == {manifest["rapc"], *manifest["packages"].values()}
    for path in wheels:  # pure Python, or built for CPython 3.12 on manylinux x86-64
        python_tag, abi, platform = path.stem.split("-")[-3:]
        assert python_tag in ("py3", "py2.py3") or (python_tag == "cp312" and abi == "cp312" and "manylinux" in platform
                                                   and platform.endswith("x86_64")), path.name
    assert sum(p.stat().st_size for p in dest.iterdir()) <= LIMIT_BYTES
    assert not set(manifest["packages"]) & {"torch", "torchvision", "numpy", "scipy", "onnxruntime"}  # on the machine


def test_the_gpu_stand_in_lacks_what_the_folder_brings(gpu_like_python):
    proc = subprocess.run([str(gpu_like_python), "-c", "import torch, onnx, click, rich, sklearn\n"
                           "for m in ('pydantic', 'torch_pruning', 'torchattacks', 'mlxtend', 'rapc'):\n"
                           "    try:\n        __import__(m)\n    except ImportError:\n        pass\n"
                           "    else:\n        raise SystemExit(m + ' is importable')"],
                          capture_output=True, text=True, cwd=gpu_like_python.parent)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_installs_from_the_folder_without_index_and_skips_the_gpu_steps_without_cuda(folder_here, gpu_like_python, tmp_path):
    wheels, _ = folder_here
    out = tmp_path / "out"
    proc = _gpu_check(gpu_like_python, wheels, out)
    assert proc.returncode == 0, proc.stdout[-4000:]
    report = (out / "gpu-check.md").read_text()
    assert "| install | ok |" in report and "pip's resolver, no index" in report
    assert f"rapc from {tmp_path}" not in report and "/venv/" in report.split("| install | ok |")[1].splitlines()[0]
    assert "| pydantic | - | " in report and "| torch-pruning | - | 1." in report  # absent before, installed from the folder
    skipped = [line for line in report.splitlines() if "| skipped | 0 | no CUDA GPU here (torch.cuda.is_available() is False) |" in line]
    assert [line.split(" | ")[0].lstrip("| ") for line in skipped] == [
        "pytest -m gpu", "rapc compress (bf16, channels_last)", "rapc export",
        "rapc bench (torch-eager-cuda, torch-cudagraphs)", "rapc bench (torch-compiled-cuda)"]
    assert "gpu-check: 2 passed, 0 failed, 5 skipped" in proc.stdout
    assert (out / "gpu-check.log").read_text().count("$ ") >= 4


def test_gpu_check_fails_when_the_folder_lacks_a_dependency(folder_here, gpu_like_python, tmp_path):
    wheels, manifest = folder_here
    partial = tmp_path / "wheels"
    shutil.copytree(wheels, partial)
    (partial / manifest["packages"].pop("torch-pruning")).unlink()
    (partial / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    proc = _gpu_check(gpu_like_python, partial, out)
    assert proc.returncode == 1
    assert "No matching distribution found for torch-pruning" in proc.stdout  # the resolver, then --no-deps
    assert "ModuleNotFoundError" in proc.stdout  # and the import check stops it
    assert "| setup | failed |" in (out / "gpu-check.md").read_text()


def test_gpu_check_says_how_to_make_a_missing_folder(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--wheels", str(tmp_path / "none"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "run `make gpu-wheels` where PyPI is reachable" in proc.stdout


def test_gpu_check_compress_settings_are_valid_and_the_random_data_has_cifar_shapes():
    """What gpu-check asks of `rapc compress` validates here, so a renamed key fails now, not on the GPU
    (in a subprocess: the `random` dataset registered there stays out of this session's registry)."""
    code = """
import sys
sys.path.insert(0, sys.argv[1])
import gpu_check, rapc_random
from rapc.config import load_config
from rapc.data import load_data
rapc_random._register_random()
args = gpu_check.COMPRESS
cfg = load_config(args[args.index("-c") + 1], [args[i + 1] for i, a in enumerate(args) if a == "--set"])
assert (cfg.data.name, cfg.precision, cfg.channels_last, cfg.model.name) == ("random", "bf16", True, "resnet18"), cfg
splits = load_data(cfg.data, cfg.seed)
image, label = splits.train[0]
assert tuple(image.shape) == (3, 32, 32) and 0 <= int(label) < 10
assert len(splits.train) >= 5 * cfg.data.batch_size and len(splits.test) >= cfg.eval.n_test
"""
    proc = subprocess.run([sys.executable, "-c", code, str(SCRIPTS)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
