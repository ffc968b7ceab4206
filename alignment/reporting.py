"""Run outputs users expect: atomic files and checkpoints, a metrics JSON, a markdown summary, PNG curves."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON via a temp file + rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(final: str | Path):
    """Yield a temp directory that becomes `final` only if the block finishes (a crash leaves no `final`)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def plot_curves(log_history: list[dict], path: str | Path, keys=("loss", "learning_rate", "grad_norm")) -> list[str]:
    """One PNG with a panel per logged key found in the trainer's log history; returns the keys plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(e["step"], e[k]) for e in log_history if k in e and "step" in e] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return []
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        ax.plot(*zip(*points), marker=".")
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return list(series)


def summary_markdown(title: str, before: dict, after: dict, notes: dict | None = None) -> str:
    """A before/after metrics table (plus free-form notes) for the run summary."""
    lines = [f"# {title}", "", "| metric | before | after | change |", "|---|---:|---:|---:|"]
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        delta = f"{a - b:+.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else ""
        lines.append(f"| {key} | {_fmt(b)} | {_fmt(a)} | {delta} |")
    for key, value in (notes or {}).items():
        lines += ["", f"**{key}**: {value}"]
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)
