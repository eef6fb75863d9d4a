"""Human-readable output of a replay: a table and a PNG of NE over the stream."""

from __future__ import annotations

from pathlib import Path

from engine.replay import ReplayResult

LABELS = {"lr": "LR only", "gbdt": "GBDT only", "gbdt_lr": "GBDT + LR", "vw": "Vowpal Wabbit"}


def render_table(result: ReplayResult) -> str:
    lines = [
        f"{result.dataset}: {result.n_rows} rows, {result.n_evaluated} evaluated "
        f"(after the GBDT warm-up), {result.tree_versions} GBDT versions",
        f"{'model':<15}{'NE':>8}{'logloss':>10}{'AUC':>8}{'calib':>8}{'ex/s':>11}",
    ]
    for name, m in result.metrics.items():
        lines.append(
            f"{LABELS[name]:<15}{m['ne']:>8.4f}{m['logloss']:>10.4f}{m['auc']:>8.4f}"
            f"{m['calibration']:>8.3f}{m['examples_per_s']:>11.0f}"
        )
    if result.oracle_ne is not None:
        lines.append(f"{'oracle (truth)':<15}{result.oracle_ne:>8.4f}")
    if result.bad_rows:
        lines.append(f"bad rows skipped and counted: {result.bad_rows}")
    lines.append(f"feature extraction: {result.extraction_s:.2f} s")
    return "\n".join(lines)


def plot_curves(result: ReplayResult, path: str | Path) -> Path:
    """Cumulative NE of every model against examples evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, curve in result.curves.items():
        xs, ys = zip(*curve, strict=True) if curve else ((), ())
        ax.plot(xs, ys, label=LABELS[name])
    if result.oracle_ne is not None:
        ax.axhline(result.oracle_ne, color="black", linestyle="--", label="oracle (truth)")
    ax.set_xlabel("examples evaluated (progressive validation)")
    ax.set_ylabel("cumulative normalized entropy")
    ax.set_title(f"{result.dataset}: NE over the stream (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
