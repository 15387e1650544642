"""PNG plots of a validation report (matplotlib, Agg backend: no display needed).

- ``plot_training_curves``: loss, activation ratio (with its target) and what the ratio control moved over
  the learn run's steps, from its log.jsonl: the gate offset under projection control, the Lagrange
  multipliers under the Lagrangian;
- ``plot_blocks_per_layer``: shared / routed / pruned FFN blocks of every layer, stacked;
- ``plot_expert_usage``: a heat map of the fraction of tokens each layer routes to each expert;
- ``plot_retention_vs_ratio``: retention against activation ratio, one point per validated method.

Each function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 110
BLOCK_COLORS = {"shared": "#4c72b0", "routed": "#dd8452", "pruned": "#c0c0c0"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def control_series(records: list[dict]) -> tuple[str, dict[str, list[float]]]:
    """(panel title, {label: per-step values}) of the quantity the run's ratio control moved.

    Projection control logs the offset added to every gate's log_alpha at each step ("offset"): the panel
    shows it and its running sum (how far the gates have moved in all). Runs without it (the Lagrangian, or
    logs written before the field existed) show the multipliers lambda1 and lambda2.
    """
    if any("offset" in r for r in records):
        offsets = [r.get("offset", math.nan) for r in records]
        total, running = 0.0, []
        for value in offsets:
            total += value if math.isfinite(value) else 0.0
            running.append(total)
        return "projection control: gate offset", {"offset per step": offsets, "cumulative offset": running}
    return "Lagrange multipliers", {key: [r.get(key, math.nan) for r in records] for key in ("lambda1", "lambda2")}


def plot_training_curves(records: list[dict], path: Path) -> Path:
    """Loss (total, distillation, LM), activation ratio vs target, and the ratio control per step.

    Args:
        records: log.jsonl lines of a learn run, each with "step" and any of loss, kd, lm, ratio,
            target, offset (projection control), lambda1, lambda2.
        path: PNG to write.
    """
    steps = [r["step"] for r in records]

    def series(key):
        return [r.get(key, math.nan) for r in records]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (("loss", "total"), ("kd", "distillation (KL)"), ("lm", "LM")):
        if any(key in r for r in records):
            axes[0].plot(steps, series(key), label=label)
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, series("ratio"), label="measured")
    axes[1].plot(steps, series("target"), "--", label="target")
    axes[1].set(title="FFN activation ratio", xlabel="step", ylim=(0, 1.05))
    axes[1].legend(fontsize=8)
    title, lines = control_series(records)
    ax = axes[2]
    handles = []
    for i, (label, values) in enumerate(lines.items()):
        if i == 1 and "cumulative offset" in lines:  # a running sum dwarfs the per-step values: own axis
            ax = axes[2].twinx()
            ax.set_ylabel(label, fontsize=8)
        handles += ax.plot(steps, values, label=label, color=f"C{i}")
    axes[2].axhline(0.0, color="grey", lw=0.6, ls=":")
    axes[2].set(title=title, xlabel="step")
    axes[2].legend(handles=handles, fontsize=8)
    return _save(fig, path)


def plot_blocks_per_layer(per_layer: list[dict], path: Path) -> Path:
    """Stacked bars of shared / routed / pruned blocks per layer (from the frozen manifest's "blocks")."""
    layers = list(range(len(per_layer)))
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(layers) + 2), 3.6))
    bottom = [0] * len(layers)
    for kind, color in BLOCK_COLORS.items():
        values = [row[kind] for row in per_layer]
        ax.bar(layers, values, bottom=bottom, color=color, label=kind, width=0.8)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(title="FFN blocks per layer", xlabel="layer", ylabel="blocks")
    ax.legend(fontsize=8, ncol=3, loc="lower right")
    return _save(fig, path)


def plot_expert_usage(usage: list[list[float]], path: Path, top_k: int) -> Path:
    """Heat map (layers x experts) of the fraction of tokens routed to each expert.

    Args:
        usage: (L, E) fractions; each row sums to top_k (every token picks top_k experts).
        path: PNG to write.
        top_k: experts per token, for the title.
    """
    L, E = len(usage), len(usage[0]) if usage else 0
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * E + 2.5), max(3.5, 0.22 * L + 1.5)))
    image = ax.imshow(usage, aspect="auto", cmap="viridis", vmin=0)
    ax.set(title=f"expert usage on the evaluation text (top-{top_k})", xlabel="expert", ylabel="layer")
    fig.colorbar(image, ax=ax, label="fraction of tokens")
    return _save(fig, path)


def plot_retention_vs_ratio(points: list[dict], path: Path) -> Path:
    """Retention against FFN activation ratio, one marker per method, dense at (1, 1).

    Args:
        points: dicts with "label", "activation_ratio", and "zero_shot_retention" and/or
            "perplexity_retention" (None or NaN when not measured).
        path: PNG to write.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.scatter([1.0], [1.0], marker="*", s=120, color="black", label="dense")
    for key, marker, name in (("zero_shot_retention", "o", "zero-shot"), ("perplexity_retention", "s", "perplexity")):
        for i, p in enumerate(points):
            value = p.get(key)
            if value is None or not math.isfinite(value):
                continue
            color = f"C{i % 10}"
            ax.scatter(p["activation_ratio"], value, marker=marker, color=color,
                       label=f"{p['label']} ({name})")
            ax.annotate(p["label"], (p["activation_ratio"], value), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    ax.set(title="retention vs FFN activation ratio", xlabel="FFN activation ratio (parameters read per token)",
           ylabel="retention (1 = dense)", xlim=(0, 1.05))
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)
