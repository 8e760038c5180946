"""study.json's rows as one table (Markdown and terminal), and robust accuracy against MACs.

The table's latency is the first requested backend that ran, at the largest batch size;
the speedup is over dense-robust on the same backend and batch, measured in the same
interleaved run. Every latency figure is in the second table. Every robust column is headed by
the judge's label of its attack and the images it saw; each figure is accuracy ± standard error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rapc.bench.report import skipped_lines
from rapc.study.cache import write_json
from rapc.study.rows import ROWS
from rapc.tables import Table

PLOT = "study.png"
BASELINE = "dense-robust"
LINE_STYLES = ("-", "--", ":", "-.")


COLUMNS = ("pgd", "ensemble", "autoattack")  # the judge's attacks the table shows (FGSM, a floor, is in study.json)


def _robust(row: dict[str, Any]) -> float:
    """The strongest attack the judge ran: the ensemble (with PGD, worst case per image)."""
    return row["judge"]["robust"]["accuracy"]


def _attacks(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in row["judge"]["attacks"]}


def _heading(attack: dict[str, Any]) -> str:
    return f"{attack['label']}, n={attack['n']}"


def _figure(attack: dict[str, Any] | None, heading: str) -> str:
    """``61.2% ± 1.5``; the label too where it is not the column's (a row judged otherwise)."""
    if attack is None:
        return "-"
    text = f"{attack['accuracy']:.1%} ± {attack['stderr'] * 100:.1f}"
    return text if _heading(attack) == heading else f"{text} ({_heading(attack)})"


def _latencies(report: dict[str, Any]) -> tuple[str, int, dict[str, float]] | None:
    """(backend, batch, p50 ms per model key) for the table's latency column."""
    if not report["latency"]:
        return None
    backend = report["latency"][0]["backend"]
    batch = max(l["batch"] for l in report["latency"] if l["backend"] == backend)
    return backend, batch, {l["artifact"]: l["p50_ms"] for l in report["latency"] if l["backend"] == backend and l["batch"] == batch}


def table(report: dict[str, Any]) -> Table:
    """One line per model. ``kept`` is the fraction of each layer's weights the cell keeps (``--ratios 4``:
    a quarter); ``fewer`` is the whole model's parameter ratio to dense, larger for filter and channel
    schemes, whose removed filters also take the next layer's input channels with them."""
    rows = report["dense"] + report["rows"]
    dense = next(row for row in report["dense"] if row["row"] == BASELINE)
    timed = _latencies(report)
    first = _attacks(rows[0])
    columns = [(name, _heading(first[name])) for name in COLUMNS if name in first]
    headers = ["kept", "scheme", "row", "params", "fewer", "MACs", f"clean, n={first['clean']['n']}", *(h for _, h in columns)]
    if timed:
        headers += [f"{timed[0]} b{timed[1]} ms", "speedup"]
    headers += ["epochs", "train s"]
    lines = []
    for row in rows:
        line = ["1" if row["ratio"] == 1 else f"1/{row['ratio']:g}", row["scheme"], row["row"], f"{row['params']:,}",
                f"{dense['params'] / row['params']:.1f}x", f"{row['macs']:,}", f"{row['judge']['clean']:.1%}",
                *(_figure(_attacks(row).get(name), heading) for name, heading in columns)]
        if timed:
            ms, base = timed[2].get(row["key"]), timed[2].get(BASELINE)
            line += [f"{ms:.3f}" if ms else "-", f"{base / ms:.2f}x" if ms and base else "-"]
        line += [" + ".join(f"{n} {e}" for n, e in row["epochs"].items()), f"{row['train_seconds']:.0f}"]
        lines.append(tuple(line))
    return Table(f"rapc study on {report['data']} (test split {report['n_test']}; L-inf eps {report['judge']['eps']:g}; "
                 "accuracy ± standard error)", tuple(headers), lines, label_columns=3)


def latency_table(report: dict[str, Any]) -> Table | None:
    if not report["latency"]:
        return None
    columns = sorted({(l["backend"], l["batch"]) for l in report["latency"]})
    p50 = {(l["artifact"], l["backend"], l["batch"]): l["p50_ms"] for l in report["latency"]}
    keys = list(dict.fromkeys(l["artifact"] for l in report["latency"]))
    rows = [(key, *(f"{p50[(key, b, n)]:.3f}" if (key, b, n) in p50 else "-" for b, n in columns)) for key in keys]
    return Table("latency, p50 ms", ("model", *(f"{b} b{n}" for b, n in columns)), rows)


def _markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    device = m.get("gpu") or f"{m['processor']}, {m['cpu_count']} CPUs, {report['threads']} torch threads"
    recipes = {row["row"]: row["recipe"] for row in report["dense"] + report["rows"]}
    parts = [
        "# rapc study", "",
        f"{report['model']['name']} (w={report['model']['width']}) on {report['data']}; measured {report['created']} on {device}.", "",
        f"**Same budget:** every row trains {report['budget_epochs']} epochs in total (pretrain + ADMM + retrain of the config); "
        "rows that start from a shared dense model count its epochs (marked shared) and do not repeat them. "
        "`train s` is the row's own seconds in training steps (validation excluded).", "",
        "Accuracy is the judge's (rapc.judge, the protocol `rapc compress` and `rapc bench` report) on the test split "
        "in PyTorch: clean, PGD and the ensemble APGD-CE + APGD-T at reference settings, worst case per image with PGD; "
        "each column is headed by its attack and the number of images n, each figure is accuracy ± its standard error "
        "(binomial, in points). `kept`: the fraction of each layer's weights a cell keeps; `fewer`: "
        "the model's parameters against dense-robust's (filter and channel pruning also remove the next layer's inputs, "
        "so they compress more than `kept` says).", "",
        *(f"- `{name}`: {recipe}" for name, recipe in recipes.items()), "",
        table(report).markdown(),
    ]
    warnings = [(row["key"], w) for row in report["dense"] + report["rows"] for w in row["judge"]["warnings"]]
    if warnings:
        parts += ["Gradient-masking warnings of the judge:", "", *(f"- `{key}`: {w}" for key, w in warnings), ""]
    if (lat := latency_table(report)) is not None:
        parts.append(lat.markdown())
    if report["skipped"]:
        parts += ["Skipped backends:", "", *(f"- {line}" for line in skipped_lines(report["skipped"])), ""]
    parts += [f"![robust accuracy vs MACs]({PLOT})", ""]
    return "\n".join(parts)


def _marker(row: str) -> str:
    """The plot marker a row registered with (rows.py); "o" for a row no longer registered."""
    return ROWS.info(row).get("marker", "o") if row in ROWS else "o"


def _plot(report: dict[str, Any], path: Path) -> None:
    """Robust accuracy against MACs: colour and marker per row, line style per scheme; the dense models are stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    names = list(dict.fromkeys(row["row"] for row in report["rows"]))
    schemes = list(dict.fromkeys(row["scheme"] for row in report["rows"]))
    for i, name in enumerate(names):
        for j, scheme in enumerate(schemes):
            points = sorted((row["macs"], _robust(row)) for row in report["rows"] if row["row"] == name and row["scheme"] == scheme)
            ax.plot(*zip(*points), marker=_marker(name), color=plt.get_cmap("tab10")(i % 10), alpha=0.85,
                    linestyle=LINE_STYLES[j % len(LINE_STYLES)], label=f"{name} ({scheme})")
    for row in report["dense"]:
        ax.scatter(row["macs"], _robust(row), marker="*", s=140, color="black" if row["row"] == BASELINE else "0.6", label=row["row"], zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("MACs per image (log scale)")
    robust = report["dense"][0]["judge"]["robust"]
    ax.set_ylabel(f"{robust['name']} accuracy (n={robust['n']})")
    ax.set_title(robust["label"], fontsize=8)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside right center")
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_report(out: Path, report: dict[str, Any]) -> None:
    write_json(out / "study.json", report)
    (out / "study.md").write_text(_markdown(report))
    _plot(report, out / PLOT)
