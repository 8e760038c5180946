"""`make gpu-check`: the one command that proves rapc's GPU half on a machine without network.

Run with the interpreter that has PyTorch (python3 on the GPU machines), from a tree that holds
.gpu-wheels/ (`make gpu-wheels`, run where PyPI is reachable). In at most --budget seconds
(default 480):

1. prints the machine and the versions of rapc's dependencies there (pip list);
2. makes a virtual environment over the system packages (outside the tree) and installs rapc
   from the wheel folder with no index: with pip's resolver, or, if it refuses (a version there
   outside rapc's bounds), every wheel of the folder with --no-deps; then checks the imports and
   that rapc comes from that environment, not from the tree;
3. with a CUDA GPU: runs the gpu-marked tests against the installed rapc (Square through the
   onnxruntime CUDA and TensorRT runners among them), a short
   `rapc compress -c cifar10-resnet18-filter` on random images of CIFAR-10's shape (bf16,
   channels_last), `rapc export --dense`, and `rapc bench` on torch-eager-cuda and
   torch-cudagraphs, then on torch-compiled-cuda, at batch 1, 8, 64, 256, dense and compressed.
   Without one it says so and skips step 3, step by step, with the reason.

Writes to --out (default $OUT if set, else gpu-check-out/): gpu-check.md (machine, versions,
steps, the bench tables), gpu-check.log (everything printed), and the run's summary.json,
fidelity.json, and each bench's report and bench.json (report.md, report-compiled.md, ...). Exit 0 when no step failed (skipped is not failed).

    python3 scripts/gpu_check.py [--wheels .gpu-wheels] [--out DIR] [--budget 480]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wheeltools  # noqa: E402
from wheeltools import ROOT, clean_env, fresh_venv, log, run  # noqa: E402

LIMIT_BYTES = 32 * 1024 * 1024
BATCH_SIZES = "1,8,64,256"
# step -> (backends, output folder in the run, seconds at most)
BENCHES = {"rapc bench (torch-eager-cuda, torch-cudagraphs)": ("torch-eager-cuda,torch-cudagraphs", "bench", 150),
           "rapc bench (torch-compiled-cuda)": ("torch-compiled-cuda", "bench-compiled", 300)}

# A few steps of each stage on random CIFAR-shaped images (scripts/rapc_random.py), in bf16 + NHWC.
COMPRESS = ["-c", "cifar10-resnet18-filter", "--set", "data.name=random", "--set", "data.workers=0",
            "--set", "stages.pretrain.epochs=1", "--set", "stages.admm.epochs=1", "--set", "stages.retrain.epochs=1",
            "--set", "admm.update_every=1", "--set", "eval.n_val=256", "--set", "eval.n_test=256",
            "--set", "precision=bf16", "--set", "channels_last=true"]

# What the versions table lists besides the folder's packages: everything rapc imports at run time.
RELEVANT = ("torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "click", "rich", "pyyaml",
            "safetensors", "scikit-learn", "numpy", "matplotlib", "scipy", "pandas", "pytest", "hypothesis", "tensorrt")

IMPORTS = ("rapc", "rapc.cli", "rapc.study", "rapc.bench", "rapc.export", "pydantic", "torch_pruning", "torchattacks",
           "mlxtend.data", "torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "sklearn", "matplotlib", "yaml",
           "safetensors", "rich", "click")


@dataclass
class Step:
    name: str
    status: str  # ok, failed, skipped
    seconds: float = 0.0
    note: str = ""


class Check:
    def __init__(self, budget: float) -> None:
        self.deadline = time.monotonic() + budget
        self.steps: list[Step] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, name: str, status: str, seconds: float = 0.0, note: str = "") -> Step:
        step = Step(name, status, seconds, note)
        self.steps.append(step)
        log(f"[{status}] {name}" + (f": {note}" if note else "") + (f" ({seconds:.0f} s)" if seconds else ""))
        return step

    def command(self, name: str, cmd: list[str], cap: float, **kw) -> bool:
        """Run one step within its cap and what is left of the budget; record how it went."""
        timeout = min(cap, self.left() - 5)
        if timeout < 20:
            self.record(name, "skipped", note=f"out of time ({self.left():.0f} s of the budget left)")
            return False
        ran = run(cmd, timeout=timeout, check=False, **kw)
        if ran.ok:
            self.record(name, "ok", ran.seconds)
        else:
            last = [line for line in ran.output.splitlines() if line.strip()][-1:] or [""]
            note = f"killed after {timeout:.0f} s" if ran.timed_out else f"exit {ran.returncode}: {last[0][:200]}"
            self.record(name, "failed", ran.seconds, note)
        return ran.ok

    @property
    def failed(self) -> list[Step]:
        return [s for s in self.steps if s.status == "failed"]


def read_folder(wheels: Path) -> tuple[Path, list[Path]]:
    """rapc's wheel and the dependency wheels of the folder, checked against its manifest and size."""
    manifest_path = wheels / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"{manifest_path} not found: run `make gpu-wheels` where PyPI is reachable and bring {wheels} along")
    manifest = json.loads(manifest_path.read_text())
    files = [wheels / manifest["rapc"], *(wheels / f for f in manifest["packages"].values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"{wheels} lacks {', '.join(missing)} (listed in its manifest): run `make gpu-wheels` again")
    size = sum(p.stat().st_size for p in wheels.iterdir() if p.is_file())
    if size > LIMIT_BYTES:
        raise SystemExit(f"{wheels} holds {size / 2**20:.1f} MiB, over {LIMIT_BYTES / 2**20:.0f} MiB")
    log(f"{wheels}: {len(files)} wheels, {size / 2**20:.1f} MiB: " + ", ".join(f.name for f in files))
    return files[0], files[1:]


def versions(python: str, names: list[str]) -> dict[str, str]:
    """name -> version as ``python`` sees it ('-' where absent)."""
    code = ("import json, sys, importlib.metadata as m\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = '-'\n"
            "print(json.dumps(out))")
    ran = run([python, "-I", "-c", code, *names], check=False, capture=True)
    return json.loads(ran.output.strip().splitlines()[-1]) if ran.ok else {}


def gpu_tests() -> list[str]:
    """The test files that hold gpu-marked tests: collecting only them keeps test modules that need
    CPU-side extras (tensorrt-rtx, modelopt) out of the way."""
    return sorted(str(p) for p in (ROOT / "tests").rglob("test_*.py")
                  if re.search(r"mark\.gpu\b", p.read_text(encoding="utf-8")))


def report(check: Check, out: Path, machine: list[str], table: dict[str, tuple[str, str]], benches: list[tuple[str, Path]]) -> Path:
    lines = ["# rapc GPU check", "", *machine, "",
             "| package | before (system) | in the check's environment |", "|---|---|---|"]
    lines += [f"| {n} | {a} | {b} |" for n, (a, b) in table.items()]
    lines += ["", "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.note} |" for s in check.steps]
    for title, path in benches:
        if path.is_file():
            lines += ["", f"## {title}: dense vs compressed", "", path.read_text()]
    path = out / "gpu-check.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "gpu-check-out"))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 8 minutes)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (venv, run); default a temporary one, removed")
    parser.add_argument("--isolated", action="store_true",
                        help="the environment sees what this interpreter imports, not its base interpreter's system "
                             "site-packages as well (tests: a stand-in for the GPU machine's packages)")
    args = parser.parse_args()

    check = Check(args.budget)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    wheeltools.LOG_FILE = (out / "gpu-check.log").open("w")
    work = args.work or Path(tempfile.mkdtemp(prefix="rapc-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    base = sys.executable
    machine = [f"- interpreter: {base} (Python {sys.version.split()[0]}, {sys.platform})"]
    table: dict[str, tuple[str, str]] = {}
    benches: list[tuple[str, Path]] = []
    try:
        rapc_wheel, deps = read_folder(args.wheels)
        check.record("wheel folder", "ok", note=f"{len(deps) + 1} wheels, no index needed")
        names = [*RELEVANT, *sorted({p.name.split("-")[0].replace("_", "-").lower() for p in deps})]
        before = versions(base, names)
        table = {n: (before.get(n, "?"), "?") for n in names}  # in the report even if the install fails

        start = time.perf_counter()
        python = fresh_venv(work / "venv", base, system_site_packages=not args.isolated)
        env = clean_env(python)
        pip = [str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(args.wheels)]
        resolved = run([*pip, str(rapc_wheel)], env=env, check=False)
        if resolved.ok:
            how = "pip's resolver, no index"
        else:
            log("pip's resolver refused the machine's versions (above); installing the folder's wheels with --no-deps")
            run([*pip, "--no-deps", str(rapc_wheel), *map(str, deps)], env=env)
            how = "--no-deps (the resolver refused: see gpu-check.log)"
        (work / "cwd").mkdir(exist_ok=True)
        run([str(python), "-c", f"import {', '.join(IMPORTS)}"], cwd=work / "cwd", env=env)
        location = wheeltools.assert_installed_in(python, work / "cwd")
        check.record("install", "ok", time.perf_counter() - start, f"{how}; rapc from {location}")
        after = versions(str(python), names)
        table = {n: (before.get(n, "?"), after.get(n, "?")) for n in names}
        for name, (a, b) in table.items():
            log(f"  {name:24} {a:>16} -> {b}")

        probe = run([str(python), "-c", "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), "
                     "torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"],
                    cwd=work / "cwd", env=env, capture=True)
        torch_version, cuda_version, has_cuda, gpu = probe.output.strip().splitlines()[-1].split(" ", 3)
        machine.append(f"- torch {torch_version}, CUDA {cuda_version}, GPU: {gpu}")
        if has_cuda != "True":
            reason = "no CUDA GPU here (torch.cuda.is_available() is False)"
            log(f"{reason}: skipping the gpu-marked tests, compress, export and bench on CUDA")
            for name in ("pytest -m gpu", "rapc compress (bf16, channels_last)", "rapc export", *BENCHES):
                check.record(name, "skipped", note=reason)
            return 0

        # From outside the tree and with -P, so that the tests (and any `python -m rapc` they start)
        # import the installed wheel, not the tree's rapc/.
        check.command("pytest -m gpu", [str(python), "-P", "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--rootdir",
                                        str(ROOT), "-c", str(ROOT / "pyproject.toml"), *gpu_tests()],
                      cap=120, cwd=work / "cwd", env=env)
        wrapper = [str(python), str(ROOT / "scripts" / "rapc_random.py")]
        run_dir = work / "runs" / "r18"
        if check.command("rapc compress (bf16, channels_last)", [*wrapper, "compress", *COMPRESS, "--out", str(run_dir)],
                         cap=150, cwd=work / "cwd", env=env):
            check.command("rapc export", [*wrapper, "export", str(run_dir), "--dense", "--n-check", "256"], cap=120,
                          cwd=work / "cwd", env=env)
            # Two benches: torch.compile compiles each model at each batch size (minutes), and a bench
            # killed at the budget's end writes no tables; eager and CUDA graphs come first, whole.
            # --no-square: the bench's Square goes through onnxruntime CPU (minutes on a ResNet-18, past
            # the caps); Square through the CUDA and TensorRT runners is in the gpu tests above.
            for step, (backends, folder, cap) in BENCHES.items():
                check.command(step, [*wrapper, "bench", str(run_dir), "--backends", backends, "--batch-sizes", BATCH_SIZES,
                                     "--n-eval", "256", "--no-square", "--min-seconds", "0.5", "--out", str(run_dir / folder)],
                              cap=cap, cwd=work / "cwd", env=env)
        else:
            for step in ("rapc export", *BENCHES):
                check.record(step, "skipped", note="compress failed")
        copies = {"summary.json": run_dir / "summary.json", "fidelity.json": run_dir / "export" / "fidelity.json"}
        for step, (_, folder, _) in BENCHES.items():
            suffix = "" if folder == "bench" else f"-{folder.removeprefix('bench-')}"
            copies |= {f"report{suffix}.md": run_dir / folder / "report.md", f"bench{suffix}.json": run_dir / folder / "bench.json"}
            benches.append((step, run_dir / folder / "report.md"))
        for name, src in copies.items():
            if src.is_file():
                shutil.copy2(src, out / name)
        return 1 if check.failed else 0
    except SystemExit as exc:  # a step that the rest cannot go on without (the folder, the install)
        if not isinstance(exc.code, str):
            raise
        check.record("setup", "failed", note=exc.code)
        return 1
    finally:
        path = report(check, out, machine, table, benches)
        log(f"gpu-check: {sum(s.status == 'ok' for s in check.steps)} passed, {len(check.failed)} failed, "
            f"{sum(s.status == 'skipped' for s in check.steps)} skipped; {path}")
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
