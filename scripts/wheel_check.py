"""`make wheel-check`: rapc as a user gets it from `pip install rapc`, not as the editable tree.

Builds the wheel, installs it (not editable, no index, no dependencies: those come from the
environment running this script, see wheeltools.fresh_venv) into a fresh virtual environment in
a temporary folder, and from a folder outside the source tree runs every command's --help and a
tiny digits compress -> export -> bench -> study. Fails if `import rapc` resolves anywhere but
the fresh environment. About a minute on 2 CPU cores.

    .venv/bin/python scripts/wheel_check.py [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wheeltools import ROOT, assert_installed_in, build_wheel, clean_env, fresh_venv, log, run  # noqa: E402

COMMANDS = ("compress", "export", "bench", "study")

# Everything short: the point is that the installed package runs end to end, not the figures.
TINY = ["--set", "stages.pretrain.epochs=1", "--set", "stages.pretrain.clean_epochs=1", "--set", "stages.admm.epochs=1",
        "--set", "stages.retrain.epochs=1", "--set", "eval.n_val=32", "--set", "eval.n_test=16"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (venv, runs) and print its path")
    args = parser.parse_args()

    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="rapc-wheel-check-"))
    if tmp.resolve().is_relative_to(ROOT):
        raise SystemExit(f"the temporary folder {tmp} is inside the source tree {ROOT}; set TMPDIR elsewhere")
    passed: list[str] = []
    try:
        wheel = build_wheel(tmp / "dist")
        log(f"built {wheel.name} ({wheel.stat().st_size / 1024:.0f} KiB)")
        python = fresh_venv(tmp / "venv", sys.executable)
        run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], env=clean_env(python))
        work = tmp / "work"
        work.mkdir()
        assert_installed_in(python, work)
        passed.append("import from the fresh environment")

        rapc = str(python.parent / "rapc")
        env = clean_env(python)
        for command in ((), *((c,) for c in COMMANDS)):
            run([rapc, *command, "--help"], cwd=work, env=env, capture=True)
            passed.append(f"rapc {' '.join(command)} --help".replace("  ", " "))

        run([rapc, "compress", "-c", "digits-lenet-filter", "--out", "runs/digits", *TINY], cwd=work, env=env)
        passed.append("rapc compress")
        run([rapc, "export", "runs/digits", "--n-check", "64"], cwd=work, env=env)
        passed.append("rapc export")
        run([rapc, "bench", "runs/digits", "--backends", "torch-eager,ort-cpu", "--batch-sizes", "1,8", "--n-eval", "64",
             "--n-ensemble", "16", "--pgd", "5x1", "--min-seconds", "0"], cwd=work, env=env)
        passed.append("rapc bench")
        run([rapc, "study", "-c", "digits-lenet-filter", "--ratios", "2", "--rows", "rapc", "--n-ensemble", "16",
             "--backends", "torch-eager", "--batch-sizes", "1", "--out", "runs/study", *TINY], cwd=work, env=env)
        passed.append("rapc study")
        for pattern in ("runs/digits/summary.json", "runs/digits/export/*.onnx", "runs/digits/bench/report.md", "runs/study/study.md"):
            if not any(work.glob(pattern)):
                raise SystemExit(f"the installed rapc wrote no {pattern}")
        passed.append("outputs written")
        assert_installed_in(python, work)  # nothing above reinstalled or shadowed it
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"wheel-check took {time.perf_counter() - start:.0f} s")
    log(f"wheel-check: {len(passed)} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
