"""Each registry is the only list of its names, and every registered name reaches the user.

A new scheme, bench backend, study row, model or dataset needs no edit outside its module and
its registration: these tests list each registry and walk every entry through the path a user
takes to it (config validation and projection, `--help`, the study's table and plot, building
a model, loading data). A new entry that a path misses fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rapc.bench.backends import BACKENDS, Backend
from rapc.bench.latency import backends_for_models
from rapc.cli import main
from rapc.config import DataConfig, ModelConfig, load_config
from rapc.data import DATASETS, DatasetInfo, Splits, load_data
from rapc.errors import RapcError
from rapc.modelio import Architecture
from rapc.models import MODELS
from rapc.pipeline.projection import Projector
from rapc.schemes import SCHEMES
from rapc.registry import Registry
from rapc.study import DEFAULT_ROWS, ROWS, StudyOptions
from rapc.study.report import _marker
from rapc.study.run import cell_config


def _lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return Architecture("lenet", {"num_classes": 10, "in_channels": 1, "image_size": 8, "width": 4,
                                  "mean": [0.5], "std": [0.25]}, [1, 8, 8]).build().eval()


def _help(*command: str) -> str:
    result = CliRunner().invoke(main, [*command, "--help"], terminal_width=10_000)  # one line per option: names never hyphen-split
    assert result.exit_code == 0, result.output
    return result.output


# --- the registry itself -------------------------------------------------------------------------


def test_a_registry_iterates_in_registration_order_and_an_unknown_name_lists_them_in_it():
    registry: Registry = Registry("colour")
    for name in ("red", "green", "blue"):
        registry.register(name)(lambda: None)
    assert list(registry) == ["red", "green", "blue"] and len(registry) == 3
    with pytest.raises(RapcError, match=r"unknown colour 'mauve'; known: red, green, blue$"):
        registry.get("mauve")


def test_what_is_given_at_registration_is_read_back_beside_the_entry():
    registry: Registry = Registry("shape")

    @registry.register("square", corners=4)
    def square():
        pass

    registry.register("circle")(lambda: None)
    assert registry.get("square") is square
    assert registry.info("square") == {"corners": 4} and registry.info("circle") == {}
    with pytest.raises(TypeError):
        registry.info("square")["corners"] = 3  # read-only: the registration is the one place to change it
    with pytest.raises(RapcError, match="known: square, circle"):
        registry.info("oval")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("square")(lambda: None)


# --- pruning schemes: config validation and the projector -----------------------------------------


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_registered_scheme_passes_config_validation_and_projects_a_lenet(name):
    cfg = load_config("digits-lenet-filter", [f"pruning.scheme={name}", f"pruning.layers=[{{pattern: fc1, scheme: {name}}}]"])
    model = _lenet()
    projector = Projector(model, torch.rand(4, 1, 8, 8), cfg.pruning)
    assert projector.targets, projector.notes
    params = dict(model.named_parameters())
    masks = projector.masks({n: params[n] for n in projector.targets}, params)
    assert any(not mask.all() for mask in masks.values())  # the scheme pruned something


@pytest.mark.parametrize("key, overrides", [
    ("pruning.scheme", ["pruning.scheme=diagonal"]),
    ("pruning.layers.1.scheme", ["pruning.layers=[{pattern: conv1, scheme: filter}, {pattern: 'conv*', scheme: diagonal}]"]),
])
def test_an_unregistered_scheme_is_rejected_by_the_config_naming_the_key_and_every_registered_scheme(key, overrides):
    with pytest.raises(RapcError) as info:  # validated once, where the config is read: every command refuses it
        load_config("digits-lenet-filter", overrides)
    assert str(info.value) == f"preset digits-lenet-filter: {key}: unknown pruning scheme 'diagonal'; known: {', '.join(SCHEMES)}"


def test_the_commands_check_scheme_names_before_any_work(tmp_path, digits_cfg):
    result = CliRunner().invoke(main, ["compress", "-c", "digits-lenet-filter", "--set", "pruning.scheme=diagonal", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and not (tmp_path / "run").exists()
    assert result.stderr.strip() == (f"error: preset digits-lenet-filter: pruning.scheme: unknown pruning scheme 'diagonal'; "
                                     f"known: {', '.join(SCHEMES)}")
    with pytest.raises(RapcError, match="study cell 2x diagonal: pruning.scheme: unknown pruning scheme 'diagonal'"):
        cell_config(digits_cfg, 2.0, "diagonal")
    for name in SCHEMES:
        assert cell_config(digits_cfg, 2.0, name).pruning.scheme == name
    assert ", ".join(SCHEMES) in _help("study")


# --- bench backends and study rows: --help and the study ------------------------------------------


def test_bench_and_study_help_name_every_registered_backend():
    bench, study = _help("bench"), _help("study")
    for name in BACKENDS:
        assert issubclass(BACKENDS.get(name), Backend)
        assert name in bench and name in study
    StudyOptions(backends=tuple(BACKENDS))  # every name passes the study's check


def test_every_registered_backend_times_a_batch_here_or_says_why_not(tmp_path):
    runnable, skipped = backends_for_models(list(BACKENDS), {"lenet": _lenet()}, (1, 8, 8), tmp_path, max_batch=8)
    assert [name for name in BACKENDS if (name, "lenet") in runnable or f"{name}:lenet" in skipped] == list(BACKENDS)
    assert all(reason for reason in skipped.values())
    for opened in runnable.values():
        opened.runner.prepare(np.random.rand(2, *opened.input_shape).astype(np.float32))
        opened.runner.transfer()
        opened.runner.run()


def test_every_registered_row_is_in_the_study_by_default_in_its_help_and_has_a_plot_marker():
    assert DEFAULT_ROWS == tuple(ROWS)
    assert StudyOptions().rows == tuple(ROWS)
    study = _help("study")
    markers = [_marker(name) for name in ROWS]
    for name in ROWS:
        summary = ROWS.info(name)["summary"]
        assert f"{name} ({summary})" in study
    assert len(set(markers)) == len(markers)  # each row its own marker in study.png


# --- models and datasets: the config's model.name and data.name -----------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_every_registered_model_builds_from_its_config_name_and_runs(name):
    info = DatasetInfo(10, 3, 32, (0.5,) * 3, (0.25,) * 3)
    model = Architecture.for_data(ModelConfig(name=name, width=4), info).build().eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_registered_dataset_is_reached_by_its_config_name(name, tmp_path):
    """Here (no network, no image folder) a torchvision or folder dataset cannot load, but its own
    loader says so: the name reached it."""
    try:
        splits = load_data(DataConfig(name=name, root=str(tmp_path)), seed=0)
    except RapcError as exc:
        assert "unknown dataset" not in str(exc) and str(tmp_path) in str(exc), exc
    else:
        assert isinstance(splits, Splits) and len(splits.test) > 0
