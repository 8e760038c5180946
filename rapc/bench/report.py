"""The bench report: bench.json (everything), report.md (the tables) and two plots.

Tables are built once as plain rows; the Markdown file and the terminal print the same rows.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

from rapc.results import JudgeResult
from rapc.rundir import atomic_write
from rapc.tables import Table

PLOTS = ("robust_vs_latency.png", "layers.png")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _models(report: dict[str, Any]) -> Table:
    d, c = report["models"]["dense"], report["models"]["compressed"]
    rows = [
        ("params", f"{d['params']:,}", f"{c['params']:,}", _ratio(d["params"], c["params"])),
        ("MACs per image", f"{d['macs']:,}", f"{c['macs']:,}", _ratio(d["macs"], c["macs"])),
        ("weights file", f"{d['weights_bytes'] / 1024:.0f} KiB", f"{c['weights_bytes'] / 1024:.0f} KiB", _ratio(d["weights_bytes"], c["weights_bytes"])),
        ("zero weights", _pct(d["sparsity"]), _pct(c["sparsity"]), ""),
    ]
    return Table("Models", ("", "dense", "compressed", "dense / compressed"), rows)


def _with_error(accuracy: float, stderr: float) -> str:
    """``61.2% ± 1.5``: the accuracy and its standard error sqrt(p(1-p)/n)."""
    return f"{accuracy:.1%} ± {stderr:.1%}"


def _stderr(p: float, n: int) -> float:
    """The standard error of an accuracy p on n images, sqrt(p(1-p)/n)."""
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def _with_error_of(p: float | None, n: int) -> str:
    """:func:`_with_error` for a figure of n images that the report keeps without its standard error."""
    return "-" if p is None else _with_error(p, _stderr(p, n))


def _verdicts(report: dict[str, Any]) -> tuple[JudgeResult, JudgeResult]:
    """The dense and compressed models' verdicts on PyTorch, as bench.json keeps them."""
    return JudgeResult.from_json(report["robustness"]["dense"]), JudgeResult.from_json(report["robustness"]["compressed"])


def _accuracy(report: dict[str, Any], dense: JudgeResult, compressed: JudgeResult) -> Table:
    """Every figure with its n and standard error, named by attack; each attack's label in the legend
    (an ensemble's label repeats PGD's: as a column it pushed the figures off an 80-column terminal)."""
    rows = [(a.name, str(a.n), _with_error(a.accuracy, a.stderr), _with_error(b.accuracy, b.stderr))
            for a, b in zip(dense.attacks, compressed.attacks)]
    n = min(a.n for a in dense.attacks)
    rows.append(("all", str(n), _with_error_of(dense.worst_case, n), _with_error_of(compressed.worst_case, n)))
    legend = "; ".join(f"{a.name}: {a.label}" for a in dense.attacks if a.name != "clean")
    legend += "; all: the worst case per image over every attack above."
    eps = report["judge"]["eps"]
    return Table(f"Accuracy on PyTorch (fp32), L-inf eps {eps:g}, {report['n_eval']} test images (± standard error)",
                 ("attack", "n", "dense", "compressed"), rows, legend=legend)


def _replay(report: dict[str, Any], dense: JudgeResult) -> Table | None:
    """Each file's accuracy on the PyTorch model's adversarial images: short columns named by attack,
    so that it fits a terminal; each attack's label and n, and the largest standard error, in the legend."""
    if not report["replay"]:
        return None
    attacks = dense.attacks
    n_all = min(a.n for a in attacks)
    rows, errors = [], [0.0]
    for key, entry in report["replay"].items():
        if "accuracy" in entry:
            figures = [(entry["accuracy"].get(a.name), a.n) for a in attacks] + [(entry["accuracy"]["all"], n_all)]
            rows.append((key, entry.get("backend", entry["runtime"].split(":")[0]), *(_pct(p) for p, _ in figures)))
            errors += [_stderr(p, n) for p, n in figures if p is not None]
        else:
            rows.append((key, f"not run: {entry['not_run']}", *("" for _ in attacks), ""))
    legend = "; ".join(f"{a.name}: {a.label}, n={a.n}" for a in attacks if a.name != "clean")
    legend += f"; all: the worst case per image over every attack. Standard errors at most {max(errors):.1%}."
    return Table("The PyTorch adversarial images replayed on each exported artifact",
                 ("artifact", "runs on", *(a.name for a in attacks), "all"), rows, label_columns=2, legend=legend)


def _deployed(report: dict[str, Any], dense: JudgeResult) -> Table | None:
    """Per exported file and runtime: clean, replay, Square and their worst case, beside PyTorch's
    figure, all on the same images; short columns (it fits 80 characters) with a legend."""
    entries = report.get("deployed") or {}
    measured = [e for e in entries.values() if "deployed" in e]
    if not entries:
        return None
    rows, not_run = [], []
    for key, e in entries.items():
        if "deployed" not in e:
            rows.append((e["artifact"], e["backend"], *("-" for _ in range(5))))
            not_run.append(f"{key}: {e['not_run']}")
            continue
        square = e["square"]
        rows.append((e["artifact"], e["backend"], _pct(e["clean"]["accuracy"]), _pct(e["replay"]["accuracy"]),
                     _pct(square["accuracy"]) if square else "-", _with_error(e["deployed"]["accuracy"], e["deployed"]["stderr"]),
                     _pct(e["pytorch"]["accuracy"])))
    ns = sorted({e["n"] for e in measured})
    squares = sorted({e["square"]["label"].split(" on ")[0] for e in measured if e["square"]})
    eps = report["judge"]["eps"]
    legend = (f"n={'/'.join(map(str, ns)) or '-'}: the first test images, L-inf eps {eps:g}. runs on: the bench backend "
              "(ort-cpu: onnxruntime CPU). replay: worst case over the PyTorch adversarial images replayed on the file. "
              + (f"Square: {', '.join(squares)} through the runtime (black-box, only its outputs). " if squares else
                 "Square: not run (--no-square). ")
              + "deployed: worst case per image of replay and Square, ± standard error. PyTorch: what the white-box attacks "
              f"left on the fp32 PyTorch model on the same images ({dense.worst_case_label.rsplit(', n=', 1)[0]}).")
    if not_run:
        legend += " Not run: " + "; ".join(not_run) + "."
    return Table("Deployed robust accuracy (each file attacked on its runtime)",
                 ("artifact", "runs on", "clean", "replay", "Square", "deployed", "PyTorch"), rows, label_columns=2, legend=legend)


def _latency(report: dict[str, Any]) -> Table:
    rows = [
        (l["backend"], str(l["batch"]), l["artifact"], f"{l['mean_ms']:.3f}", f"{l['p50_ms']:.3f}", f"{l['p90_ms']:.3f}",
         f"{l['p99_ms']:.3f}", f"{l['images_per_s']:,.0f}", f"{l['cv']:.0%}" + (" !" if l["noisy"] else ""), "-" if l["transfer_ms"] is None else f"{l['transfer_ms']:.3f}")
        for l in sorted(report["latency"], key=lambda l: (l["backend"], l["batch"], l["artifact"]))
    ]
    headers = ("backend", "batch", "artifact", "mean ms", "p50 ms", "p90 ms", "p99 ms", "images/s", "CV", "transfer ms")
    return Table("Latency (compute; input transfer apart)", headers, rows)


def _ms(ms: float) -> str:
    """Three significant figures, five characters up to 10 s (``0.224``, ``1.80``, ``19.4``, ``171``): the speedup
    table fits 80 columns; the latency table keeps every digit."""
    decimals = 3 if ms < 1 else 2 if ms < 10 else 1 if ms < 100 else 0
    return f"{ms:.{decimals}f}"


def _speedup(report: dict[str, Any]) -> Table:
    """The speedup beside the MAC ratio it could reach; the parameter ratios, one per model, in the legend."""
    ordered = sorted(report["speedup"], key=lambda s: (s["backend"], s["artifact"], s["batch"]))
    rows = [(s["backend"], s["artifact"], str(s["batch"]), _ms(s["dense_ms"]), _ms(s["ms"]), f"{s['speedup']:.2f}x",
             f"{s['mac_ratio']:.2f}x") for s in ordered]
    params = {s["artifact"]: s["param_ratio"] for s in ordered}
    legend = ("ms: mean latency; speedup, MAC ratio and parameter ratio are dense / artifact. Parameter ratio: "
              + ", ".join(f"{artifact} {ratio:.2f}x" for artifact, ratio in sorted(params.items())) + ".")
    headers = ("backend", "artifact", "batch", "dense ms", "ms", "speedup", "MAC ratio")
    return Table("Speedup over the dense model (same backend, batch and run)", headers, rows, label_columns=2, legend=legend)


def _layers(report: dict[str, Any]) -> Table:
    rows = []
    for layer in report["layers"]:
        before, after = layer["shape_before"], layer["shape_after"]
        rows.append((layer["name"], "x".join(map(str, before)), "x".join(map(str, after)), f"{after[0]}/{before[0]}",
                     f"{layer['macs_before']:,} -> {layer['macs_after']:,}", _pct(layer["sparsity_after"])))
    return Table("Per layer: dense -> compressed", ("layer", "dense weight", "compressed weight", "kept filters", "MACs", "zeros left"), rows)


def skipped_lines(skipped: dict[str, str]) -> list[str]:
    """One line per backend and reason, listing the artifacts it skipped."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for key, reason in skipped.items():
        backend, artifact = key.split(":", 1)
        grouped.setdefault((backend, reason), []).append(artifact)
    return [f"{backend} ({', '.join(artifacts)}): {reason}" for (backend, reason), artifacts in sorted(grouped.items())]


def tables(report: dict[str, Any]) -> list[Table]:
    dense, compressed = _verdicts(report)
    return [t for t in (_models(report), _accuracy(report, dense, compressed), _replay(report, dense), _deployed(report, dense),
                        _speedup(report), _latency(report), _layers(report)) if t]


def _markdown_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    device = m.get("gpu") or f"{m['processor']}, {m['cpu_count']} CPUs"
    parts = [
        f"# rapc bench: {report['run']}",
        "",
        f"{report['compressed']}. Measured {report['created']} on {device}; torch {m['versions'].get('torch')}, "
        f"{m['torch_threads']} threads (onnxruntime pinned to the same).",
        "",
    ]
    if report["warnings"]:
        parts += ["## Warnings", "", *(f"- {w}" for w in report["warnings"]), ""]
    parts += [t.markdown() for t in tables(report)]
    if report["skipped"]:
        parts += ["## Skipped backends", "", *(f"- {line}" for line in skipped_lines(report["skipped"])), ""]
    parts += ["## Plots", "", *(f"![{p}]({p})" for p in PLOTS), ""]
    return "\n".join(parts)


PRECISION_MARKERS = {"fp32": "o", "fp16": "^", "int8": "D"}
LABEL_OFFSETS = ((4, 3), (4, -10), (4, 12), (4, -19))  # points: right of the marker, alternately above and below
MIN_SPAN = 10.0  # percentage points: the y-axis never spans less, so that a 2-point difference looks like one


def _y_range(points: list[dict[str, Any]]) -> tuple[float, float]:
    """In percent: every point with its error bar, padded, at least MIN_SPAN wide, within [0, 100]."""
    low = min(100 * (p["accuracy"] - p["stderr"]) for p in points)
    high = max(100 * (p["accuracy"] + p["stderr"]) for p in points)
    pad = max(1.0, 0.1 * (high - low))
    low, high = low - pad, high + pad
    if high - low < MIN_SPAN:
        middle = (low + high) / 2
        low, high = middle - MIN_SPAN / 2, middle + MIN_SPAN / 2
    shift = max(0.0, -low) - max(0.0, high - 100)
    return max(0.0, low + shift), min(100.0, high + shift)


def _plot_accuracy_vs_latency(report: dict[str, Any], path: Path) -> None:
    """Deployed robust accuracy (%, ± standard error) against p50 latency, one panel per batch size,
    each point labelled with its artifact. Colour: backend; marker: precision; filled: compressed,
    hollow: dense. PyTorch backends show the white-box figure of the fp32 model on the same images."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    points = [l for l in report["latency"] if l.get("deployed")]
    batches = sorted({l["batch"] for l in points}) or [0]
    cols = min(2, len(batches))
    rows = math.ceil(len(batches) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False, layout="constrained")
    backends = sorted({l["backend"] for l in points})
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
    y_range = _y_range([l["deployed"] for l in points]) if points else (0.0, 100.0)
    for ax, batch in zip(axes.flat, batches):
        panel = sorted((l for l in points if l["batch"] == batch), key=lambda l: (round(l["deployed"]["accuracy"], 3), l["p50_ms"]))
        row: list[float] = []  # accuracies of the points labelled so far at this height: their labels take turns above and below
        for l in panel:
            model, _, precision = l["artifact"].partition(".")
            color, figure = colors[l["backend"]], l["deployed"]
            row = [*row, figure["accuracy"]] if row and abs(row[-1] - figure["accuracy"]) < 0.005 else [figure["accuracy"]]
            offset = LABEL_OFFSETS[(len(row) - 1) % len(LABEL_OFFSETS)]
            ax.errorbar(l["p50_ms"], 100 * figure["accuracy"], yerr=100 * figure["stderr"], fmt="none", ecolor=color, alpha=0.6,
                        capsize=3)
            ax.scatter(l["p50_ms"], 100 * figure["accuracy"], marker=PRECISION_MARKERS.get(precision or "fp32", "o"), s=45,
                       edgecolors=color, facecolors=color if model == "compressed" else "none", zorder=3)
            ax.annotate(l["artifact"], (l["p50_ms"], 100 * figure["accuracy"]), xytext=offset, textcoords="offset points",
                        fontsize=6.5, color=color)
        times = [l["p50_ms"] for l in points if l["batch"] == batch] or [1.0]
        wide = max(times) > 10 * min(times)  # log scale only where it spans a decade: narrower, its tick labels collide
        if wide:
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(LogLocator(subs=(2, 5)))
            for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
                axis(FormatStrFormatter("%g"))
        ax.set_ylim(*y_range)
        ax.set_xlabel("p50 latency (ms, log scale)" if wide else "p50 latency (ms)")
        ax.set_ylabel("deployed robust accuracy (%)")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(batches):]:
        ax.axis("off")
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=b) for b, c in colors.items()]
    handles += [Line2D([], [], color="0.3", marker=m, linestyle="", label=p) for p, m in PRECISION_MARKERS.items()]
    handles += [Line2D([], [], color="0.3", marker="o", linestyle="", label="compressed (filled)"),
                Line2D([], [], color="0.3", marker="o", markerfacecolor="none", linestyle="", label="dense (hollow)")]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    ns = sorted({l["deployed"]["n"] for l in points})
    labels = sorted({l["deployed"]["label"] for l in points})
    caption = (f"deployed robust accuracy vs latency (± standard error, n={'/'.join(map(str, ns)) or '-'})\n"
               + textwrap.fill("; ".join(labels) or "nothing measured", 120))
    fig.suptitle(caption, fontsize=8.5)
    fig.savefig(path, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)


def _plot_layers(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    layers = report["layers"]
    names = [l["name"] for l in layers]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5), layout="constrained")
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], [l["shape_before"][0] for l in layers], height=0.4, label="dense", color="0.7")
    ax.barh([i - 0.2 for i in y], [l["shape_after"][0] for l in layers], height=0.4, label="compressed", color="tab:blue")
    ax.set_yticks(list(y), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output channels (filters)")
    ax.set_title("kept filters per layer")
    ax.legend()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_report(out: Path, report: dict[str, Any]) -> list[Path]:
    """bench.json, report.md and the plots, each written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    files = [
        atomic_write(out / "bench.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1))),
        atomic_write(out / "report.md", lambda tmp: tmp.write_text(_markdown_report(report))),
    ]
    for name, plot in zip(PLOTS, (_plot_accuracy_vs_latency, _plot_layers)):
        files.append(atomic_write(out / name, lambda tmp, plot=plot: plot(report, tmp)))
    return files
