"""`make floor-check`: rapc on the lowest versions pyproject.toml allows, so its lower bounds are tested ones.

Downloads the given versions (NAME==VERSION ..., for this interpreter) into .floor-wheels/, installs
them into a fresh virtual environment over .venv's packages (they shadow .venv's newer ones), and
runs there the wheel check (scripts/wheel_check.py: the built wheel, every --help, a digits
compress -> export -> bench -> study) and pytest against the installed wheel (default: the whole
suite; pass other pytest arguments after --).

    .venv/bin/python scripts/floor_check.py torch==2.11.0 torchvision==0.26.0 ... [-- tests/export]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wheeltools import ROOT, build_wheel, clean_env, fresh_venv, log, run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="NAME==VERSION of each package at its floor")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".floor-wheels", help="download cache")
    parser.add_argument("--keep", action="store_true", help="keep the floor environment and print its path")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    pytest_args = argv[split + 1:] or ["tests"]

    args.wheels.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(args.wheels), *args.versions])
    def key(name: str, version: str) -> tuple[str, str]:
        return name.lower().replace("_", "-"), version

    wanted = {key(*v.split("==")) for v in args.versions}
    wheels = [p for p in args.wheels.glob("*.whl") if key(*p.name.split("-")[:2]) in wanted]
    if len(wheels) != len(wanted):
        raise SystemExit(f"expected {len(wanted)} wheels in {args.wheels}, found {', '.join(p.name for p in wheels)}")
    tmp = Path(tempfile.mkdtemp(prefix="rapc-floor-"))
    try:
        python = fresh_venv(tmp / "venv", sys.executable)
        env = clean_env(python)
        run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", *map(str, sorted(wheels))], env=env)
        run([str(python), "-m", "pip", "list"], env=env, capture=False, check=False)
        run([str(python), str(ROOT / "scripts" / "wheel_check.py")], env=env, cwd=tmp)
        # The tests of the installed wheel, run from outside the tree (and -P) so that neither pytest
        # nor the `python -m rapc` processes of the tests import the tree's rapc/.
        run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(build_wheel(tmp / "dist", str(python)))], env=env)
        (tmp / "cwd").mkdir()
        run([str(python), "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
             *(str(ROOT / a) if (ROOT / a.split("::")[0]).exists() else a for a in pytest_args)], env=env, cwd=tmp / "cwd")
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    log("floor-check: " + " ".join(args.versions) + ": passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
