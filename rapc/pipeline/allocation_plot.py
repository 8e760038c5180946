"""An allocation drawn: what the allocator measured and what it chose, beside the allocation's table
(allocation.md). Apart from the solver, so that solving imports no plotting library.
"""

from __future__ import annotations

from pathlib import Path

from rapc.pipeline.allocation import Allocation


def plot_sensitivity(allocation: Allocation, path: str | Path) -> Path:
    """Per unit, the loss rise against the ratio it was pruned at alone; the chosen ratio is a star. PNG."""
    sens = allocation.sensitivity
    if sens is None:
        raise ValueError("this allocation has no sensitivity measurement to plot")
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for i, unit in enumerate(u for u in allocation.units if u.name in sens.rise):
        color = plt.get_cmap("tab10")(i % 10)
        ax.plot([0.0, *sens.ratios], [0.0, *sens.rise[unit.name]], marker="o", color=color, label=unit.name)
        ax.plot([unit.ratio], [sens.at(unit.name, unit.ratio)], marker="*", markersize=14, color=color, markeredgecolor="black")
    ax.set_xlabel("ratio (fraction pruned), this unit alone")
    ax.set_ylabel(f"adversarial loss rise (nats, over {sens.baseline:.3f})")
    ax.set_title(f"{sens.attack}, {sens.n_images} images; stars: chosen ratios "
                 f"({allocation.achieved:.3f} of the dense {allocation.metric})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path
