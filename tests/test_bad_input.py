"""Bad input, in one table: every mistake a user can make is one `error:` line that names the
problem (the key, the file, the value), exit code 2, and never a traceback.

Each case builds what it needs under tmp_path (a copy of the session's digits run where it
corrupts one) and returns the `rapc` arguments; the cases run in-process through the console
script's click group, and one of them also through the real console script.

Covered elsewhere with the same checks, so not repeated here:
  tests/test_cli.py::test_user_mistakes_are_one_line_errors_with_exit_code_2: pruning.ratio=1.5,
      attack.eval.eps=-1, unknown dataset, unknown model, an import path without allow_import, a
      missing config file, torchvision data files missing with data.download off, a missing
      stages.start_from, bad model arguments, device=cuda without a GPU
  tests/test_cli.py::test_console_script_reports_a_bad_config_and_an_unwritable_directory_without_traceback
  tests/export/test_onnx.py::test_export_command_prints_the_files_and_fails_cleanly_on_a_non_run
  tests/export/test_tensorrt.py::test_without_any_tensorrt_export_writes_onnx_and_exits_2_with_one_line (`--trt`)
  tests/bench/test_run.py::test_bad_bench_options_are_one_line_errors: --batch-sizes 0, an unknown
      backend, malformed --batch-sizes and --pgd
  tests/pipeline/test_resume.py: --resume with --set, a directory without a run to resume, a new
      run into a directory that holds one
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rapc.cli import main

RAPC = shutil.which("rapc") or str(Path(sys.executable).with_name("rapc"))

Make = Callable[[Path, Path], list[str]]  # (tmp_path, the session's digits run) -> rapc arguments


def compress(*settings: str, config: str = "digits-lenet-filter") -> Make:
    """`rapc compress` on a config with ``--set`` overrides, into a fresh run directory."""
    sets = [arg for s in settings for arg in ("--set", s)]
    return lambda tmp, run: ["compress", "-c", config, *sets, "--out", str(tmp / "out")]


def config_file(text: str) -> Make:
    def make(tmp: Path, run: Path) -> list[str]:
        (tmp / "my.yaml").write_text(text)
        return compress(config=str(tmp / "my.yaml"))(tmp, run)

    return make


def images(layout: dict[str, dict[str, int]], *settings: str, junk: str | None = None) -> Make:
    """An imagefolder under tmp/images: {split: {class: number of images}}, plus an unreadable file at ``junk``."""

    def make(tmp: Path, run: Path) -> list[str]:
        root = tmp / "images"
        for split, classes in layout.items():
            (root / split).mkdir(parents=True)
            for label, n in classes.items():
                (root / split / label).mkdir()
                for i in range(n):
                    Image.new("RGB", (12, 10), color=(40 * i, 0, 0)).save(root / split / label / f"{i}.png")
        if junk:
            (root / junk).write_bytes(b"not an image")
        return compress("data.name=imagefolder", f"data.root={root}", *settings)(tmp, run)

    return make


def damaged(command: str, damage: Callable[[Path], None], *options: str) -> Make:
    """`rapc COMMAND RUN` on a copy of the digits run (at tmp/run) after ``damage(copy)``."""

    def make(tmp: Path, run: Path) -> list[str]:
        copy = Path(shutil.copytree(run, tmp / "run", ignore=shutil.ignore_patterns("export", "bench")))
        damage(copy)
        return [*command.split(), str(copy), *options]

    return make


def edit_architecture(**changes: Any) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / "compressed" / "architecture.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))

    return damage


def truncate(path: str, size: int) -> Callable[[Path], None]:
    return lambda run: (run / path).write_bytes((run / path).read_bytes()[:size])


def interrupted_with_corrupt_checkpoint(run: Path) -> None:
    for finished in ("summary.json", "trained.json"):  # killed while training: resume reads the checkpoints
        (run / finished).unlink()
    (run / "checkpoints" / "retrain.pt").write_bytes(b"garbage")


def corrupt_onnx(run: Path) -> None:
    (run / "export").mkdir()
    (run / "export" / "compressed.onnx").write_bytes(b"not a protobuf")
    (run / "export" / "fidelity.json").write_text(json.dumps({"artifacts": {"compressed.onnx": {"model": "compressed", "precision": "fp32"}}}))


def unwritable_output(tmp: Path, run: Path) -> list[str]:
    (tmp / "file").write_text("")
    return ["export", str(run), "--out", str(tmp / "file" / "export")]


EXPORT = ("--n-check", "10")
BENCH = ("--n-eval", "10", "--backends", "torch-eager", "--batch-sizes", "1", "--min-seconds", "0.01")
TWO_CLASSES = {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2, "dog": 2}}

# id, what the user did, words the error line must contain ({tmp}: the test's tmp_path, {run}: the digits run)
CASES = [
    # config: validated before anything runs
    ("unknown-key", compress("pruning.colour=3"), ["pruning.colour: unknown key"]),
    ("unknown-key-in-file", config_file("stages: {admm: {epoch: 3}}\n"), ["{tmp}/my.yaml", "stages.admm.epoch: unknown key"]),
    ("wrong-type", compress("stages.admm.epochs=many"), ["stages.admm.epochs", "valid integer", "'many'"]),
    ("value-used-as-section", compress("data.name.root=x"), ["--set data.name.root: name is a value, not a section"]),
    ("ratio-one", compress("pruning.ratio=1"), ["pruning.ratio", "less than 1", "(got 1)"]),
    ("ratio-negative", compress("pruning.ratio=-0.25"), ["pruning.ratio", "greater than or equal to 0", "-0.25"]),
    ("layer-rule-prunes-every-filter", compress("pruning.layers=[{pattern: conv1, ratio: 1.0}]"), ["pruning.layers.0.ratio", "less than 1"]),
    ("eps-negative", compress("attack.train.eps=-0.1"), ["attack.train.eps", "greater than or equal to 0", "-0.1"]),
    ("unknown-scheme", compress("pruning.scheme=diagonal"), ["pruning.scheme", "'diagonal'", "known: filter"]),
    ("unknown-layer-rule-scheme", compress("pruning.layers=[{pattern: 'conv*', scheme: rows}]"), ["pruning.layers.0.scheme", "'rows'"]),
    ("unknown-preset", compress(config="no-such-preset"), ["unknown preset 'no-such-preset'", "digits-lenet-filter"]),
    ("invalid-yaml", config_file("data: {name: [unclosed\n"), ["{tmp}/my.yaml: not valid YAML"]),
    ("kwargs-override-the-dataset", compress("model.kwargs={num_classes: 3}"), ["model.kwargs: num_classes is set from the dataset"]),
    # data and model: checked when the run starts
    ("channels-do-not-fit-the-model", compress("model.name=torchvision.models:resnet18", "model.allow_import=true"),
     ["model torchvision.models:resnet18 does not accept digits images of shape [1, 8, 8]", "3 channels"]),
    ("image-size-does-not-fit-the-model", images(TWO_CLASSES, "model.name=torchvision.models:alexnet", "model.allow_import=true"),
     ["model torchvision.models:alexnet does not accept imagefolder images of shape [3, 32, 32]", "too small"]),
    ("factory-returns-no-module", compress("model.name=collections:OrderedDict", "model.allow_import=true"),
     ["model 'collections:OrderedDict' returned OrderedDict, not a torch.nn.Module"]),
    ("imagefolder-without-classes", images({"train": {}, "test": {}}), ["imagefolder: {tmp}/images/train holds no images", "class folder"]),
    ("imagefolder-without-images", images({"train": {"cat": 0}, "test": {"cat": 0}}), ["imagefolder: {tmp}/images/train holds no images", "cat"]),
    ("imagefolder-classes-differ", images({"train": {"cat": 3, "dog": 3}, "test": {"cat": 2}}),
     ["{tmp}/images/train has the classes cat, dog but {tmp}/images/test has cat"]),
    ("imagefolder-unreadable-image", images(TWO_CLASSES, junk="train/cat/junk.png"), ["{tmp}/images/train/cat/junk.png is not a readable image"]),
    ("loss-becomes-nan", compress("stages.pretrain.epochs=0", "stages.admm.epochs=1", "stages.admm.optimizer.lr=1e6", "eval.n_val=50"),
     ["admm epoch 1: the training loss became nan", "stages.admm.optimizer.lr"]),
    # files of a run: named with what is wrong in them
    ("corrupt-checkpoint", damaged("compress --resume", interrupted_with_corrupt_checkpoint),
     ["{tmp}/run/checkpoints/retrain.pt: not a loadable checkpoint"]),
    ("truncated-safetensors", damaged("export", truncate("compressed/weights.safetensors", 500), *EXPORT),
     ["{tmp}/run/compressed/weights.safetensors: corrupt or truncated safetensors file"]),
    ("architecture-does-not-match-weights", damaged("export", edit_architecture(pruning_history=[]), *EXPORT),
     ["{tmp}/run/compressed/weights.safetensors: tensor conv1.weight has shape", "the architecture expects [8, 1, 5, 5]"]),
    ("architecture-unknown-builder", damaged("export", edit_architecture(builder="alexnet"), *EXPORT),
     ["{tmp}/run/compressed/architecture.json: unknown model 'alexnet'; known: lenet"]),
    ("architecture-malformed", damaged("export", edit_architecture(input_shape=[1, 8]), *EXPORT),
     ["{tmp}/run/compressed/architecture.json: unreadable architecture record", "input_shape [channels, height, width]"]),
    ("start-from-weights-of-another-width", compress("stages.start_from={run}", "model.width=8"),
     ["{run}/dense/weights.safetensors: tensor conv1.weight has shape [8, 1, 5, 5], the architecture expects [16, 1, 5, 5]"]),
    ("start-from-a-pruned-model", compress("stages.start_from={run}/compressed"), ["stages.start_from: {run}/compressed holds a pruned model"]),
    ("run-without-model", damaged("export", lambda run: shutil.rmtree(run / "compressed"), *EXPORT), ["{tmp}/run/compressed does not exist"]),
    ("corrupt-onnx", damaged("bench", corrupt_onnx, *BENCH), ["{tmp}/run/export/compressed.onnx: onnxruntime cannot load it"]),
    ("unwritable-output-directory", unwritable_output, ["cannot write", "{tmp}/file/export", "Not a directory"]),
]


def _fill(text: str, tmp: Path, run: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{run}", str(run))


def _arguments(make: Make, tmp: Path, run: Path) -> list[str]:
    return [_fill(arg, tmp, run) for arg in make(tmp, run)]


def assert_one_error_line(exit_code: int, stdout: str, stderr: str, words: list[str]) -> None:
    assert exit_code == 2, stderr
    assert "Traceback" not in stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr  # one line, and the last one
    for word in words:
        assert word in errors[0]


@pytest.mark.parametrize("make, words", [pytest.param(make, words, id=case) for case, make, words in CASES])
def test_bad_input_is_one_error_line_naming_the_problem_and_exit_code_2(make, words, tmp_path, digits_run):
    result = CliRunner().invoke(main, _arguments(make, tmp_path, digits_run))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert_one_error_line(result.exit_code, result.stdout, result.stderr, [_fill(w, tmp_path, digits_run) for w in words])


def test_the_console_script_prints_the_same_single_line(tmp_path, digits_run):
    _, make, words = next(case for case in CASES if case[0] == "imagefolder-without-images")
    proc = subprocess.run([RAPC, *_arguments(make, tmp_path, digits_run)], capture_output=True, text=True, timeout=120)
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, [_fill(w, tmp_path, digits_run) for w in words])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_gpu_backend_without_a_gpu_is_listed_as_skipped_with_the_reason(tmp_path, digits_run):
    result = CliRunner().invoke(main, ["bench", str(digits_run), "--out", str(tmp_path), "--n-eval", "10",
                                       "--backends", "torch-eager,torch-eager-cuda", "--batch-sizes", "1", "--min-seconds", "0.01"])
    assert result.exit_code == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("skipped torch-eager-cuda")]
    assert line.endswith(": no CUDA GPU") and "dense" in line and "compressed" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_only_unrunnable_backends_is_a_one_line_error_naming_them(tmp_path, digits_run):
    result = CliRunner().invoke(main, ["bench", str(digits_run), "--out", str(tmp_path), "--n-eval", "10",
                                       "--backends", "torch-eager-cuda", "--batch-sizes", "1"])
    assert_one_error_line(result.exit_code, result.stdout, result.stderr, ["torch-eager-cuda", "no CUDA GPU"])
