"""`make gpu-wheels`: the wheels a GPU machine without network needs to install rapc, in one folder.

The GPU machines lent to this project have Python 3.12 (x86-64), PyTorch 2.11 with CUDA and a
long list of packages (GPU_HAS), no network, and take at most 64 MiB of files along. This
script, run where PyPI is reachable, puts into DEST (default .gpu-wheels/, ignored by git):

- rapc's own wheel, built from this tree;
- every package in the closure of rapc's requirements that the GPU machine lacks, or whose
  version there cannot be trusted to satisfy a pin, at the version installed in .venv (the
  tested one), for CPython 3.12 manylinux x86-64, without dependencies (the closure is ours);
- manifest.json (package -> file), which `make gpu-check` reads to install them.

Fails if the folder exceeds 32 MiB. The list is computed from the metadata, not kept by hand:
a new dependency of rapc is either on the GPU machine (GPU_HAS) or lands in the folder.

    .venv/bin/python scripts/gpu_wheels.py [--dest .gpu-wheels] [--no-download] [--python-version 3.12]

--python-version other than 3.12 makes the same folder for another CPython (the tests use this
machine's, to install it here).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wheeltools import ROOT, build_wheel, log, run  # noqa: E402

LIMIT_BYTES = 32 * 1024 * 1024

# The GPU machines' image ('cuda'), package names as read on one of them on 2026-11-17 (the
# device notes' list; the issue's list is a subset). rapc's closure stops at these.
GPU_HAS = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())

# Versions seen there (a session's pip list, 2026-11); a requirement these do not satisfy stops the script.
GPU_VERSIONS = {"torch": "2.11.0", "torchvision": "0.26.0", "onnx": "1.23.1", "onnxruntime": "1.30.0",
                "onnxscript": "0.7.2", "safetensors": "0.8.0", "numpy": "2.5.2"}

# On the machine, but shipped all the same: pydantic-core needs typing-extensions>=4.16 (July 2026),
# and the image's version is unknown. A wheel in the folder shadows the machine's only inside
# gpu-check's virtual environment.
ALWAYS_SHIP = frozenset({"typing-extensions"})

# The GPU machine's interpreter, for requirement markers.
PYTHON = "3.12"
TARGET = {"python_version": PYTHON, "python_full_version": f"{PYTHON}.3", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
          "os_name": "posix", "extra": ""}

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(name).decode())
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def _on_gpu(req: Requirement) -> bool:
    """Whether the GPU machine's copy of ``req``'s package can be trusted to satisfy it."""
    name = canonicalize_name(req.name)
    if name not in GPU_HAS or name in ALWAYS_SHIP:
        return False
    if name in GPU_VERSIONS:
        if not req.specifier.contains(GPU_VERSIONS[name], prereleases=True):
            raise SystemExit(f"rapc's closure requires {req} but the GPU machines have {name} {GPU_VERSIONS[name]}: "
                             "relax the bound (after testing that version) or ship the package")
        return True
    # Version unknown there: a lower bound is assumed met (a current image); an upper bound or a pin
    # (requests~=2.25.1 in torchattacks) is not, so that package comes along.
    return not any(s.operator in ("<", "<=", "==", "~=", "===") for s in req.specifier)


def closure(requirements: list[Requirement], python: str = PYTHON) -> dict[str, str]:
    """Package -> version (as installed here) for everything the GPU machine needs from us."""
    target = {**TARGET, "python_version": python, "python_full_version": f"{python}.0"}
    ship: dict[str, str] = {}
    todo = list(requirements)
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate(target):
            continue
        name = canonicalize_name(req.name)
        if name in ship or _on_gpu(req):
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{name} (required: {req}) is not installed here; run `make setup` first") from None
        version = dist.version
        if not req.specifier.contains(version, prereleases=True):
            raise SystemExit(f"{req} is required but {name} {version} is installed here")
        ship[name] = version
        todo.extend(Requirement(r) for r in dist.requires or [])
    return dict(sorted(ship.items()))


def folder_bytes(dest: Path) -> int:
    return sum(p.stat().st_size for p in dest.iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".gpu-wheels")
    parser.add_argument("--no-download", action="store_true", help="only build rapc's wheel and print the list")
    parser.add_argument("--python-version", default=PYTHON, help=f"CPython X.Y the wheels are for (default {PYTHON}, the GPU machines')")
    args = parser.parse_args()
    dest: Path = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("*.whl"):  # one version of each package, or the install stops
        stale.unlink()

    wheel = build_wheel(dest)
    packages = closure(wheel_requirements(wheel), args.python_version)
    log("for the GPU machine: " + ", ".join(f"{n}=={v}" for n, v in packages.items()))
    if args.no_download:
        return 0
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", args.python_version,
         "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(dest),
         *(f"{n}=={v}" for n, v in packages.items())])

    files = {}
    for path in sorted(dest.glob("*.whl")):
        name = canonicalize_name(path.name.split("-")[0])
        if name in files:
            raise SystemExit(f"two wheels of {name} in {dest}: {files[name]} and {path.name}")
        files[name] = path.name
    missing = sorted(set(packages) - set(files))
    if missing:
        raise SystemExit(f"pip download left out {', '.join(missing)}")
    manifest = {"rapc": wheel.name, "packages": {n: files[n] for n in packages},
                "target": f"CPython {args.python_version}, manylinux x86-64", "versions": packages}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    size = folder_bytes(dest)
    for path in sorted(dest.iterdir(), key=lambda p: -p.stat().st_size):
        log(f"  {path.stat().st_size / 1024:8.0f} KiB  {path.name}")
    log(f"{dest}: {len(files)} wheels, {size / 2**20:.1f} MiB (limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    if size > LIMIT_BYTES:
        raise SystemExit(f"{dest} holds {size / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB that a GPU machine takes along")
    return 0


if __name__ == "__main__":
    sys.exit(main())
