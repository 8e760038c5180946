"""What the trainer measures each epoch, read from a real digits run's metrics.jsonl."""

import json


def test_validation_runs_where_it_decides_something_and_at_every_stages_end(digits_run):
    """A stage that keeps its best epoch validates the epochs trained at full eps (the candidates); ADMM,
    which keeps its last, only its last (its figures there are the hard prune's reference). Pretraining's
    two clean epochs (digits preset) are not validated: PGD passes that decide nothing."""
    records = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    epochs = {}
    for r in records:
        if "epoch" in r:
            epochs.setdefault(r["stage"], []).append(r)
    assert len(epochs["admm"]) == 2 and len(epochs["pretrain"]) == 4
    for stage, rows in epochs.items():
        validated = ["val_robust" in r for r in rows]
        if stage in ("admm", "dense-admm"):
            assert validated == [False] * (len(rows) - 1) + [True], stage
        elif stage == "pretrain":
            assert validated == [False, False, True, True]
        else:
            assert all(validated), stage
    assert "val_robust" in next(r for r in records if r["stage"] == "hard_prune")
