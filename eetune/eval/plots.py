"""The report's PNG plots, drawn from report.json's structure (so they can be redrawn from it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eetune.infer.policy import CONFIDENCES, describe_thresholds
from eetune.rundir import atomic_write

EXITS_PLOT = "exits.png"
SPEED_QUALITY_PLOT = "speed_quality.png"
EXIT_HISTOGRAM_PLOT = "exit_histogram.png"
RELIABILITY_PLOT = "reliability.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    _pyplot().close(fig)
    return path


def _label(entry: dict[str, Any]) -> str:
    return f"final {entry['layer']}" if entry["final"] else f"exit {entry['layer']}"


def plot_exits(report: dict[str, Any], path: Path) -> Path:
    """Held-out cross-entropy and top-1 agreement with the final layer, per exit."""
    plt = _pyplot()
    entries = report["per_exit"]
    labels = [_label(e) for e in entries]
    colors = ["tab:gray" if e["final"] else "tab:blue" for e in entries]
    fig, (ce_ax, agree_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    ce_bars = ce_ax.bar(labels, [e["cross_entropy"] for e in entries], color=colors)
    ce_ax.bar_label(ce_bars, fmt="%.2f", fontsize=8)
    ce_ax.set_ylabel("held-out cross-entropy (nats/token)")
    ce_ax.set_title("cross-entropy per exit")
    agree_bars = agree_ax.bar(labels, [100 * e["agreement"] for e in entries], color=colors)
    agree_ax.bar_label(agree_bars, fmt="%.0f%%", fontsize=8)
    agree_ax.set_ylim(0, 105)
    agree_ax.set_ylabel("top-1 agreement with the final layer (%)")
    agree_ax.set_title("agreement per exit")
    for ax in (ce_ax, agree_ax):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(report["title"], fontsize=10)
    return _save(fig, path)


def plot_speed_quality(report: dict[str, Any], path: Path) -> Path:
    """Measured speedup vs agreement with the full model for every setting of the sweep."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sweep = report["sweep"]
    full = next(r for r in sweep if r["mode"] == "full")
    markers = ("o-", "s-", "^-", "v-", "P-", "X-")
    for i, confidence in enumerate(CONFIDENCES):
        marker = markers[i % len(markers)]
        ours = [r for r in sweep if r["confidence"] == confidence]
        rows = sorted((r for r in ours if r.get("exit_thresholds") is None), key=lambda r: -r["threshold"])
        if rows:
            xs = [full["speedup"]] + [r["speedup"] for r in rows]
            ys = [100 * full["token_agreement"]] + [100 * r["token_agreement"] for r in rows]
            line = ax.plot(xs, ys, marker, label=f"early exit, {confidence} confidence")[0]
            for r in rows:
                ax.annotate(f"{r['threshold']:g}", (r["speedup"], 100 * r["token_agreement"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        per_exit = [r for r in ours if r.get("exit_thresholds") is not None]
        for j, r in enumerate(per_exit):
            ax.plot(r["speedup"], 100 * r["token_agreement"], marker[0], fillstyle="none", markersize=9,
                    color=line.get_color() if rows else None,
                    label=f"early exit, {confidence}, one threshold per exit" if j == 0 else None)
            ax.annotate(describe_thresholds(r["exit_thresholds"]), (r["speedup"], 100 * r["token_agreement"]),
                        fontsize=6, xytext=(3, -8), textcoords="offset points")
    for r in sweep:
        if r["mode"] == "self_speculative":
            ax.plot(r["speedup"], 100 * r["token_agreement"], "*", markersize=14, color="tab:red",
                    label=f"self-speculative (lossless), {r['speedup']:.2f}x")
    ax.plot(full["speedup"], 100, "D", color="black", label="full model")
    oracle = report["oracle"]
    ax.axvline(oracle["speedup"], ls="--", color="tab:green",
               label=f"oracle bound at 100% agreement, {oracle['speedup']:.2f}x (cost model)")
    ax.set_xlabel("decode speedup vs the full model (measured tokens/s ratio)")
    ax.set_ylabel("greedy-token agreement with the full model (%)")
    ax.set_title("speed vs quality across thresholds (labels: threshold, or one per exit)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_exit_histogram(report: dict[str, Any], path: Path) -> Path:
    """Share of generated tokens leaving at each layer, per setting of the sweep."""
    plt = _pyplot()
    sweep = [r for r in report["sweep"] if r["mode"] != "full"]
    layers = sorted({int(layer) for r in report["sweep"] for layer in r["exit_counts"]})
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(sweep) + 1.6))
    names = [r["setting"] for r in sweep]
    left = [0.0] * len(sweep)
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        shares = []
        for r in sweep:
            total = sum(r["exit_counts"].values()) or 1
            shares.append(100 * r["exit_counts"].get(str(layer), 0) / total)
        name = f"final {layer}" if layer == report["num_layers"] else f"exit {layer}"
        ax.barh(names, shares, left=left, color=cmap(i / max(len(layers) - 1, 1)), label=name)
        left = [a + b for a, b in zip(left, shares)]
    ax.set_xlabel("generated tokens leaving at each layer (%)")
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right", ncol=min(len(layers), 4))
    ax.set_title("exit-layer histogram (engine sweep)", fontsize=10)
    return _save(fig, path)


def plot_reliability(report: dict[str, Any], path: Path) -> Path:
    """Reliability diagrams: max probability vs accuracy, per exit and for the final layer."""
    plt = _pyplot()
    entries = report["per_exit"]
    fig, axes = plt.subplots(1, len(entries), figsize=(3.0 * len(entries), 3.2), squeeze=False)
    for ax, e in zip(axes[0], entries):
        ax.plot([0, 1], [0, 1], ":", color="gray")
        for key, style, name in (("reliability", "o-", "next token"), ("reliability_vs_final", "s--", "final's top-1")):
            bins = [b for b in e[key] if b["count"]]
            if bins and not (e["final"] and key == "reliability_vs_final"):
                ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style, markersize=3,
                        label=f"vs {name}")
        ax.set_title(f"{_label(e)}: ECE {e['ece']:.3f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("max probability")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def draw_all(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    return {
        "exits": plot_exits(report, out_dir / EXITS_PLOT),
        "speed_quality": plot_speed_quality(report, out_dir / SPEED_QUALITY_PLOT),
        "exit_histogram": plot_exit_histogram(report, out_dir / EXIT_HISTOGRAM_PLOT),
        "reliability": plot_reliability(report, out_dir / RELIABILITY_PLOT),
    }
