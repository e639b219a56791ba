"""The search's pictures: metric against latency and size (every candidate, the front, the choice,
the original and the baselines), and per-layer sensitivity. matplotlib's Agg backend: files only."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from graphopt.files import atomic_path

if TYPE_CHECKING:
    from graphopt.search.compress import CompressResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def tradeoff_plot(result: "CompressResult", path: str) -> str:
    """Two panels (metric vs latency, metric vs size on disk), each with the allowed-drop line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    floor = result.original.metric - result.allowed_drop
    done = [t for t in result.trials if t.status == "complete"]
    front = set(id(t) for t in result.front)
    for ax, key, label, scale in ((axes[0], "latency_ms", f"latency ms ({result.goal.timed_in()})", 1.0),
                                  (axes[1], "size_bytes", "size on disk (KB)", 1e-3)):
        def value(item):
            v = getattr(item, key)
            return None if v is None else v * scale
        points = [(value(t), t.metric) for t in done if value(t) is not None]
        if points:
            ax.scatter(*zip(*points), s=18, color="0.6", label="candidates")
        line = sorted((value(t), t.metric) for t in done if id(t) in front and value(t) is not None)
        if line and key == {"latency": "latency_ms", "size": "size_bytes"}.get(result.goal.objective):
            ax.plot(*zip(*line), "-o", color="tab:blue", ms=5, label="Pareto front")
        if value(result.original) is not None:
            ax.scatter([value(result.original)], [result.original.metric], marker="s", s=60, color="black",
                       label="original (fp32)")
        if result.accuracy_control is not None and value(result.accuracy_control) is not None:
            ax.scatter([value(result.accuracy_control)], [result.accuracy_control.metric], marker="^", s=70,
                       color="tab:green", label="accuracy control (int8, sensitive layers float)")
        for i, b in enumerate(p for p in result.baselines if value(p) is not None and p.metric == p.metric):
            ax.scatter([value(b)], [b.metric], marker="D", s=45, color=f"C{3 + i}", label=b.name)
        if result.chosen is not None and value(result.chosen) is not None:
            ax.scatter([value(result.chosen)], [result.chosen.metric], marker="*", s=220, color="tab:red",
                       label=f"chosen: {result.chosen.recipe.label()}")
        ax.axhline(floor, ls="--", color="tab:red", lw=1, label=f"allowed drop ({result.allowed_drop:.3g})")
        ax.set_xlabel(label)
        ax.set_ylabel("metric")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"graphopt compress: {result.goal.describe()}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def sensitivity_plot(result: "CompressResult", path: str, top: int = 25) -> str | None:
    """Per-layer output error when half a layer's channels are cut / when it alone is int8, and the
    metric against the share of MACs pruned before any fine-tuning."""
    s = result.sensitivity
    if not (s.prune_layers or s.quant_layers or s.sweep):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, values, title in ((axes[0], s.prune_layers, "pruning: half the channels cut"),
                              (axes[1], s.quant_layers, "int8: layer quantized alone")):
        ranked = sorted(values.items(), key=lambda kv: -kv[1])[:top]
        if ranked:
            ax.barh([k for k, _ in ranked][::-1], [v for _, v in ranked][::-1], color="tab:blue")
            ax.set_xscale("log")
            ax.tick_params(axis="y", labelsize=6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("relative output error")
    if s.sweep:
        xs = [0.0] + list(s.sweep)
        ys = [result.original.metric] + list(s.sweep.values())
        axes[2].plot([x * 100 for x in xs], ys, "-o")
        axes[2].axhline(result.original.metric - result.allowed_drop, ls="--", color="tab:red", lw=1)
    axes[2].set_title("pruning sweep, no fine-tuning", fontsize=9)
    axes[2].set_xlabel("% of MACs removed")
    axes[2].set_ylabel("metric")
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: "CompressResult") -> dict[str, str]:
    plots = {"tradeoff": tradeoff_plot(result, os.path.join(result.out_dir, "tradeoff.png"))}
    sensitivity = sensitivity_plot(result, os.path.join(result.out_dir, "sensitivity.png"))
    if sensitivity:
        plots["sensitivity"] = sensitivity
    return plots
