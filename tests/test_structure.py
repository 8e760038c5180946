"""The layer rule of docs/architecture.md, read from the source: cli -> study -> bench -> export /
pipeline -> core. A helper that a lower layer needs lives in that layer or below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rapc"
LAYERS = {"core": 0, "pipeline": 1, "export": 1, "bench": 2, "study": 3, "cli": 4}
COMMAND = "rapc.pipeline.compress"  # the compress command's orchestration


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[1:2] == ["cli"] or parts[1:2] == ["__main__"]:
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def _modules() -> list[str]:
    return [".".join(("rapc", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
            for p in sorted(PACKAGE.rglob("*.py"))]


def _tree(module: str) -> ast.Module:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return ast.parse(path.read_text())


def _imports(module: str) -> dict[str, set[str]]:
    """Every rapc module imported anywhere in ``module`` (lazy imports inside functions too), with the names taken."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rapc"):
            found.setdefault(node.module, set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rapc"):
                    found.setdefault(alias.name, set())
    return found


def test_the_layers_are_found():
    layers = {_layer(m) for m in _modules()}
    assert layers == set(LAYERS), layers


@pytest.mark.parametrize("module", _modules())
def test_a_module_imports_only_its_own_layer_and_the_layers_below(module):
    here = _layer(module)
    for imported in _imports(module):
        there = _layer(imported)
        assert there == here or LAYERS[there] < LAYERS[here], f"{module} ({here}) imports {imported} ({there})"


@pytest.mark.parametrize("module", _modules())
def test_only_commands_use_the_compress_command(module):
    """compress.py is orchestration: the CLI runs it and the study runs it as one of its rows, by its
    entry points; nothing imports it for a helper."""
    names = _imports(module).get(COMMAND)
    if names is None or module == COMMAND:
        return
    assert _layer(module) in ("cli", "study"), f"{module} imports the compress command"
    assert names <= {"compress", "resume", "train", "resume_training"}, f"{module} imports helpers {names} from {COMMAND}"


def _calls(module: str, name: str) -> int:
    """Calls of ``name`` (``name(...)`` or ``x.name(...)``) in ``module``."""
    return sum(1 for node in ast.walk(_tree(module)) if isinstance(node, ast.Call)
               and (getattr(node.func, "id", None) == name or getattr(node.func, "attr", None) == name))


def test_only_the_builder_constructs_a_trainer():
    """compress and every study row build their runs one way (rapc.pipeline.parts): seeded, in the same order."""
    assert [m for m in _modules() if _calls(m, "Trainer")] == ["rapc.pipeline.parts"]


# Keys inside the judge's JSON (summary.json's models, a study row's or bench.json's verdicts):
# rapc/results.py reads and writes them, everything else asks its types. judgement.py's own
# safetensors header has an "attacks" list of its own.
JUDGE_JSON_KEYS = {"attacks", "worst_case", "worst_case_label", "broken_by", "file_bytes"}
JUDGE_JSON_OWNERS = {"rapc.results", "rapc.judgement"}


def _string_keys(module: str) -> set[str]:
    """String constants ``module`` indexes with (``x["key"]``) or looks up (``x.get("key")``)."""
    keys = set()
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            keys.add(node.slice.value)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            keys.add(node.args[0].value)
    return keys


@pytest.mark.parametrize("module", sorted(set(_modules()) - JUDGE_JSON_OWNERS))
def test_the_judges_json_is_read_through_its_types(module):
    assert not _string_keys(module) & JUDGE_JSON_KEYS, f"{module} reads the judge's JSON by its keys; use rapc.results"
