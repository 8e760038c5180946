"""study.json's rows as one table (Markdown and terminal), and robust accuracy against MACs.

The table's latency is the first requested backend that ran, at the largest batch size;
the speedup is over dense-robust on the same backend and batch, measured in the same
interleaved run. Every latency figure is in the second table. Every robust column is headed by
the judge's label of its attack and the images it saw; each figure is accuracy ± standard error
with one seed, and the mean ± standard deviation across seeds with several (each seed's figures
are in study.json, under the row's ``seeds``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rapc.bench.report import skipped_lines
from rapc.study.cache import write_json
from rapc.study.rows import ROWS, at_eps
from rapc.tables import Table

PLOT = "study.png"
BASELINE = "dense-robust"
LINE_STYLES = ("-", "--", ":", "-.")


COLUMNS = ("pgd", "ensemble", "autoattack")  # the judge's attacks the table shows (FGSM, a floor, is in study.json)


def _robust(row: dict[str, Any]) -> dict[str, Any]:
    """The strongest attack the judge ran: the ensemble (with PGD, worst case per image)."""
    return row["robust"]


def _attacks(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in row["figures"]}


def _spread(figure: dict[str, Any]) -> float:
    """The ± of a figure: the standard deviation across seeds, or with one seed its standard error."""
    return figure["std"] if figure["std"] is not None else figure["stderr"]


def _heading(attack: dict[str, Any]) -> str:
    return f"{attack['label']}, n={attack['n']}"


def _figure(attack: dict[str, Any] | None, heading: str) -> str:
    """``61.2% ± 1.5``; the label too where it is not the column's (a row judged otherwise)."""
    if attack is None:
        return "-"
    text = f"{attack['mean']:.1%} ± {_spread(attack) * 100:.1f}"
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
                f"{dense['params'] / row['params']:.1f}x", f"{row['macs']:,}", _clean(_attacks(row)["clean"]),
                *(_figure(_attacks(row).get(name), heading) for name, heading in columns)]
        if timed:
            ms, base = timed[2].get(row["key"]), timed[2].get(BASELINE)
            line += [f"{ms:.3f}" if ms else "-", f"{base / ms:.2f}x" if ms and base else "-"]
        line += [" + ".join(f"{n} {e}" for n, e in row["epochs"].items()), f"{row['train_seconds']:.0f}"]
        lines.append(tuple(line))
    return Table(f"rapc study on {report['data']} (test split {report['n_test']}; L-inf eps {report['judge']['eps']:g}; "
                 f"{_what_spread(report)})", tuple(headers), lines, label_columns=3)


def _clean(figure: dict[str, Any]) -> str:
    return f"{figure['mean']:.1%}" if figure["std"] is None else f"{figure['mean']:.1%} ± {figure['std'] * 100:.1f}"


def _what_spread(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    if len(seeds) == 1:
        return "accuracy ± standard error"
    return f"mean ± standard deviation across {len(seeds)} seeds ({', '.join(map(str, seeds))})"


def _schedules(report: dict[str, Any]) -> list[str]:
    """The report's lines on the rows' training schedules, from what each row recorded."""
    matched = [row for row in report["dense"] if row["row"] == "dense-matched"]
    rows = matched + report["rows"]
    if not rows:
        return []
    first = rows[0]["schedule"]
    stages = " + ".join(f"{p['epochs']} {p['stage']} ({p['optimizer']} lr {p['lr']:g}, {p['schedule']})" for p in first)
    natural = (" finetune-standard runs all three after pruning the natural dense model, whose clean epochs come on top."
               if any(row["row"] == "finetune-standard" for row in rows) else "")
    lines = [f"**Equal schedules:** every row trains through the config's stages' recipes once and in order, {stages} epochs, "
             f"{rows[0]['full_eps_epochs']} of them at full eps; rows that start from a shared dense model count its epochs "
             f"(marked shared) and do not repeat them.{natural} `train s` is the row's own seconds in training steps "
             "(validation excluded); each row's phases are in study.json (`schedule`)."]
    differ = [row["key"] for row in rows if at_eps(row["schedule"]) != at_eps(first)]
    if differ:
        lines.append(f"**Unequal schedules:** {', '.join(differ)} trained at eps on another schedule than {rows[0]['key']}; see study.json.")
    return lines


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
        *_schedules(report), "",
        "Accuracy is the judge's (rapc.judge, the protocol `rapc compress` and `rapc bench` report) on the test split "
        "in PyTorch: clean, PGD and the ensemble APGD-CE + APGD-T at reference settings, worst case per image with PGD; "
        "each column is headed by its attack and the number of images n. "
        + ("Each figure is accuracy ± its standard error (binomial, in points)." if len(report["seeds"]) == 1 else
           f"Every model was trained with {len(report['seeds'])} seeds ({', '.join(map(str, report['seeds']))}); each figure is "
           "the mean ± the standard deviation across them (in points); each seed's figures, with their standard errors, "
           "are in study.json.")
        + " `kept`: the fraction of each layer's weights a cell keeps; `fewer`: "
        "the model's parameters against dense-robust's (filter and channel pruning also remove the next layer's inputs, "
        "so they compress more than `kept` says).", "",
        *(f"- `{name}`: {recipe}" for name, recipe in recipes.items()), "",
        table(report).markdown(),
    ]
    warnings = [(row["key"], w) for row in report["dense"] + report["rows"] for w in row["warnings"]]
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
            points = sorted((row["macs"], _robust(row)["mean"], _robust(row)["std"] or 0.0)
                            for row in report["rows"] if row["row"] == name and row["scheme"] == scheme)
            macs, mean, std = zip(*points)
            ax.errorbar(macs, mean, yerr=std if len(report["seeds"]) > 1 else None, marker=_marker(name), capsize=3,
                        color=plt.get_cmap("tab10")(i % 10), alpha=0.85, linestyle=LINE_STYLES[j % len(LINE_STYLES)],
                        label=f"{name} ({scheme})")
    for k, row in enumerate(sorted(report["dense"], key=lambda row: row["row"] != BASELINE)):  # dense-robust black, the others grey
        ax.errorbar(row["macs"], _robust(row)["mean"], yerr=_robust(row)["std"], marker="*", markersize=12, linestyle="none",
                    capsize=3, color=str(min(0.75, 0.3 * k)), label=row["row"], zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("MACs per image (log scale)")
    robust = _robust(report["dense"][0])
    spread = f", mean ± std of {len(report['seeds'])} seeds" if len(report["seeds"]) > 1 else ""
    ax.set_ylabel(f"{robust['name']} accuracy (n={robust['n']}{spread})")
    ax.set_title(robust["label"], fontsize=8)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside right center")
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_report(out: Path, report: dict[str, Any]) -> None:
    write_json(out / "study.json", report)
    (out / "study.md").write_text(_markdown(report))
    _plot(report, out / PLOT)
