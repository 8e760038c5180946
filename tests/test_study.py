"""rapc study on digits: rapc's pipeline and the from-scratch baseline, cached per row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rapc.cli import main
from rapc.config import Config, load_config
from rapc.errors import RapcError
from rapc.pipeline.compress import Trainer
from rapc.study import DEFAULT_ROWS, ROWS, study

TINY = ("stages.pretrain.epochs=2", "stages.pretrain.clean_epochs=1", "stages.admm.epochs=1", "stages.retrain.epochs=1")


@pytest.fixture(scope="module")
def tiny_cfg() -> Config:
    return load_config("digits-lenet-filter", TINY)


@pytest.fixture(scope="module")
def study_dir(tiny_cfg: Config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "digits"
    study(tiny_cfg, out, [2], ["filter"])
    return out


def _rows(out: Path) -> dict[str, dict]:
    return {row["row"]: row for row in json.loads((out / "study.json").read_text())["rows"]}


def test_study_runs_rapc_and_scratch_rows_with_sane_figures(study_dir: Path) -> None:
    rows = _rows(study_dir)
    assert set(rows) == set(DEFAULT_ROWS)
    rapc, scratch = rows["rapc"], rows["scratch"]
    # filter pruning at 2x halves filters and the next layer's inputs: at least 2x fewer parameters
    assert 2 <= rapc["dense_params"] / rapc["params"] <= 4.5
    assert rapc["macs"] < rapc["dense_macs"]
    assert scratch["params"] == rapc["params"] and scratch["macs"] == rapc["macs"]
    for row in rows.values():
        assert 0 <= row["robust"] <= row["clean"] <= 1
        assert row["train_seconds"] > 0
    assert scratch["epochs"] == {"scratch": rapc["epochs"]["admm"] + rapc["epochs"]["retrain"]}
    assert (study_dir / "r2-filter" / "rapc" / "summary.json").is_file()


def test_study_writes_a_markdown_table_naming_rows_not_yet_implemented(study_dir: Path) -> None:
    text = (study_dir / "study.md").read_text()
    assert "| 2x | filter | rapc |" in text and "| 2x | filter | scratch |" in text
    assert "Not implemented yet: inherited" in text
    assert "inherited" not in ROWS


def test_study_rerun_reads_finished_rows_without_training(study_dir: Path, tiny_cfg: Config, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a finished row was trained again")

    monkeypatch.setattr("rapc.study.compress", fail)
    monkeypatch.setattr("rapc.study.resume", fail)
    monkeypatch.setattr(Trainer, "stage", fail)
    before = _rows(study_dir)
    result = study(tiny_cfg, study_dir, [2], ["filter"])
    assert {row["row"]: row for row in result.rows} == before


def test_study_refuses_a_row_directory_made_with_another_config(study_dir: Path, tiny_cfg: Config) -> None:
    other = tiny_cfg.model_copy(deep=True)
    other.stages.admm.epochs = 2
    with pytest.raises(RapcError, match="another config"):
        study(other, study_dir, [2], ["filter"])


@pytest.mark.parametrize(("ratios", "schemes", "rows", "message"), [
    ([0.5], ["filter"], DEFAULT_ROWS, "not a compression factor"),
    ([2], ["bogus"], DEFAULT_ROWS, "pruning.scheme"),
    ([2], ["filter"], ("rapc", "nope"), "unknown study row 'nope'"),
])
def test_study_rejects_bad_input_before_training(tiny_cfg: Config, tmp_path: Path, ratios, schemes, rows, message) -> None:
    with pytest.raises(RapcError, match=message):
        study(tiny_cfg, tmp_path / "s", ratios, schemes, rows)
    assert not (tmp_path / "s").exists()


def test_study_command_prints_the_table_of_a_finished_study(study_dir: Path) -> None:
    args = ["study", "-c", "digits-lenet-filter", "--ratios", "2", "--schemes", "filter", "--out", str(study_dir)]
    result = CliRunner().invoke(main, args + [arg for kv in TINY for arg in ("--set", kv)])
    assert result.exit_code == 0, result.output
    assert "scratch" in result.output and "study.md" in result.output


def test_study_command_reports_a_bad_ratio_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["study", "-c", "digits-lenet-filter", "--ratios", "2,x", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "comma-separated numbers" in result.output


def test_study_row_without_its_result_file_is_remeasured_from_its_checkpoints(study_dir: Path, tiny_cfg: Config, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("trained again")

    before = _rows(study_dir)["scratch"]
    (study_dir / "r2-filter" / "scratch" / "row.json").unlink()  # as if killed after training, before writing it
    monkeypatch.setattr("rapc.study.compress", fail)
    monkeypatch.setattr("rapc.pipeline.compress.train_epoch", fail)
    after = {row["row"]: row for row in study(tiny_cfg, study_dir, [2], ["filter"]).rows}["scratch"]
    assert (after["params"], after["epochs"], after["train_seconds"]) == (before["params"], before["epochs"], before["train_seconds"])
    assert (study_dir / "r2-filter" / "scratch" / "row.json").is_file()
