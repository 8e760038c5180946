import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from rapc.config import dump_config, load_config, presets, updated
from rapc.errors import RapcError

ROOT = Path(__file__).resolve().parents[1]


def test_default_is_the_mnist_lenet_filter_preset():
    cfg = load_config()
    assert (cfg.data.name, cfg.model.name, cfg.pruning.scheme) == ("mnist5k", "lenet", "filter")
    assert cfg.attack.train.eps == pytest.approx(0.3)


@pytest.mark.parametrize("name", ["mnist-lenet-filter", "mnist-lenet-filter-long", "mnist-lenet-column", "cifar10-resnet18-filter", "cifar10-vgg16-column"])
def test_required_presets_load_with_the_papers_threat_model(name):
    cfg = load_config(name)
    if name.startswith("cifar10"):
        assert cfg.attack.train.eps == pytest.approx(8 / 255, abs=1e-6)
        assert cfg.attack.train.step_size == pytest.approx(2 / 255, abs=1e-6)
    else:
        assert cfg.attack.train.eps == pytest.approx(0.3)
    assert name in presets()


def test_overrides_are_parsed_as_yaml_and_nested():
    cfg = load_config("mnist-lenet-filter", ["pruning.ratio=0.75", "stages.admm.epochs=7", "pruning.keep_dense=[fc1]", "seed=3"])
    assert (cfg.pruning.ratio, cfg.stages.admm.epochs, cfg.pruning.keep_dense, cfg.seed) == (0.75, 7, ["fc1"], 3)


@pytest.mark.parametrize(
    "override, key",
    [
        ("pruning.ratio=1.5", "pruning.ratio"),
        ("attack.train.eps=-0.1", "attack.train.eps"),
        ("pruning.colour=3", "pruning.colour: unknown key"),
        ("stages.admm.epochs=many", "stages.admm.epochs"),
        ("pruning.nm=[4, 4]", "N must be smaller than M"),
        ("pruning.round_to=0", "pruning.round_to"),
        ("pruning.round_to=eight", "pruning.round_to"),
        ("data=3", "data"),
        ("novalue", "expected KEY=VALUE"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(RapcError) as info:
        load_config("mnist-lenet-filter", [override])
    message = str(info.value)
    assert key in message and "\n" not in message


def test_unknown_preset_and_missing_file_list_the_presets(tmp_path):
    with pytest.raises(RapcError, match="mnist-lenet-filter"):
        load_config("no-such-preset")
    with pytest.raises(RapcError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_invalid_yaml_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {name: [unclosed\n")
    with pytest.raises(RapcError, match="not valid YAML"):
        load_config(str(bad))


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("cifar10-resnet18-filter", ["pruning.layers=[{pattern: 'layer4.*', ratio: 0.75}]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(str(path)) == cfg


def test_a_run_config_from_before_pruning_round_to_loads_with_its_shrink_round_to_unchanged(tmp_path):
    """Old runs' config.yaml hold shrink.round_to (every one: the resolved config writes it); it keeps its meaning."""
    cfg = load_config("mnist-lenet-filter")
    old = yaml.safe_load(dump_config(cfg))
    del old["pruning"]["round_to"]
    old["shrink"]["round_to"] = 8
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    loaded = load_config(str(path))
    assert loaded.shrink.round_to == 8 and loaded.pruning.round_to == 1


def test_presets_ship_inside_a_plain_wheel(tmp_path):
    """Presets must be usable by name after a non-editable install: they are package data."""
    source = tmp_path / "src"  # setuptools builds in the source tree: build a copy, keep the checkout clean
    for folder in ("rapc", "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / file, source / file)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("rapc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for preset in ("mnist-lenet-filter", "mnist-lenet-column", "cifar10-resnet18-filter", "cifar10-vgg16-column"):
        assert f"rapc/configs/{preset}.yaml" in names


def test_updated_validates_a_change_as_a_files_value_and_names_its_source():
    cfg = load_config("digits-lenet-filter")
    cell = updated(cfg, "a cell", pruning={"scheme": "column", "ratio": 0.75})
    assert (cell.pruning.scheme, cell.pruning.ratio) == ("column", 0.75) and cfg.pruning.ratio != 0.75
    assert updated(cfg) == cfg and cell.stages == cfg.stages and cell.pruning.layers == cfg.pruning.layers
    assert updated(cfg, pruning={"target": {"macs": 0.5}}).pruning.target.macs == 0.5  # a part that was None
    with pytest.raises(RapcError, match=r"^a cell: pruning.ratio: Input should be less than 1 \(got 2.0\)"):
        updated(cfg, "a cell", pruning={"ratio": 2.0})
    with pytest.raises(RapcError, match="a cell: pruning.ratios: unknown key"):
        updated(cfg, "a cell", pruning={"ratios": 0.5})
    with pytest.raises(RapcError, match="a cell: scheme: unknown pruning scheme 'diagonal'; known: filter"):
        updated(cfg.pruning, "a cell", scheme="diagonal")
