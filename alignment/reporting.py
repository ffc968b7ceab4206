"""Run outputs users expect: atomic files and checkpoints, a metrics JSON, a markdown summary, PNG curves.

Every file a run writes goes through `atomic_path` (a temp name beside the target, renamed into place when complete),
so a crash never leaves half a file where a resumed run or a reader would pick it up. The temp name is fixed per
target (`.<stem>.tmp<suffix>`), so a leftover from a killed run is replaced by the next write instead of piling up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from alignment.timing import step_time_line


@contextlib.contextmanager
def atomic_path(path: str | Path, directory: bool = False):
    """Yield a temp path beside `path` (a fresh empty directory when `directory`); it becomes `path` only if the
    block finishes (an existing `path` is replaced), and is removed if the block raises.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with atomic_path(root / "a.txt") as tmp:
    ...     _ = tmp.write_text("done")
    >>> (root / "a.txt").read_text(), sorted(p.name for p in root.iterdir())
    ('done', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if directory and path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file via `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON via `atomic_path`, so a crash never leaves half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def atomic_directory(final: str | Path):
    """A temp directory that becomes `final` only if the block finishes (a crash leaves no `final`)."""
    return atomic_path(final, directory=True)


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def write_log_history(out: str | Path, log_history: list[dict]) -> None:
    """The trainer's log history as `<out>/log_history.json` (the pipeline report plots it)."""
    write_json_atomic(Path(out) / "log_history.json", log_history)


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
    save_figure(fig, path)
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


CURVE_KEYS = ("loss", "reward", "success_rate", "rewards/margins", "rewards/accuracies")


def pipeline_report(root: str | Path, stages: list[tuple[str, Path]]) -> Path:
    """`<root>/report.md` (every finished stage's held-out metrics before/after, its training summary, and for an RL
    stage its step time: `train.step_time` of its metrics.json, `alignment.timing.step_time_line`) and
    `<root>/report.png` (a row of training curves per stage), from each stage's metrics.json and log_history.json."""
    root = Path(root)
    lines = ["# Pipeline report", "", "| stage | metric | before | after | change |", "|---|---|---:|---:|---:|"]
    curves, step_times = [], []
    for name, out in stages:
        metrics_file = Path(out) / "metrics.json"
        if not metrics_file.is_file():
            lines.append(f"| {name} | (not run yet) | | | |")
            continue
        metrics = json.loads(metrics_file.read_text())
        before, after = metrics.get("before", {}), metrics.get("after", {})
        for key in sorted(set(before) | set(after)):
            b, a = before.get(key), after.get(key)
            delta = f"{a - b:+.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else ""
            lines.append(f"| {name} | {key} | {_fmt(b)} | {_fmt(a)} | {delta} |")
        split = metrics.get("train", {}).get("step_time")
        if split:
            step_times += ["", f"**{name} step time**: {step_time_line(split)}"]
        history_file = Path(out) / "log_history.json"
        if history_file.is_file():
            curves.append((name, json.loads(history_file.read_text())))
    lines += ["", "Training curves: report.png; per-stage summary.md, curves.png and TensorBoard logs under each "
              "stage's directory.", *step_times]
    path = root / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    _plot_stage_curves(curves, root / "report.png")
    return path


def _plot_stage_curves(curves: list[tuple[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, {k: [(e["step"], e[k]) for e in history if k in e and "step" in e] for k in CURVE_KEYS})
            for name, history in curves]
    rows = [(name, {k: v for k, v in series.items() if v}) for name, series in rows]
    rows = [(name, series) for name, series in rows if series]
    if not rows:
        return
    width = max(len(series) for _, series in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(4.5 * width, 3 * len(rows)), squeeze=False)
    for r, (name, series) in enumerate(rows):
        for c in range(width):
            ax = axes[r][c]
            if c >= len(series):
                ax.axis("off")
                continue
            key, points = list(series.items())[c]
            ax.plot(*zip(*points), marker=".")
            ax.set_title(f"{name}: {key}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


REPORT_BEGIN, REPORT_END = "<!-- pipeline report: begin -->", "<!-- pipeline report: end -->"


def embed_report(report: str | Path, target: str | Path) -> None:
    """Replace what stands between the report markers in the markdown file `target` with the table of the
    pipeline report `report` (its lines from the table header on), so a README quotes a run instead of retyping it.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> _ = (root / "report.md").write_text("# Pipeline report\\n\\n| stage | metric |\\n|---|---|\\n| sft | x |\\n")
    >>> _ = (root / "README.md").write_text(f"intro\\n{REPORT_BEGIN}\\nold\\n{REPORT_END}\\nrest\\n")
    >>> embed_report(root / "report.md", root / "README.md")
    >>> print((root / "README.md").read_text())
    intro
    <!-- pipeline report: begin -->
    | stage | metric |
    |---|---|
    | sft | x |
    <!-- pipeline report: end -->
    rest
    <BLANKLINE>
    """
    lines = Path(report).read_text().splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("|")):]
    table = table[: next((i for i, line in enumerate(table) if not line.startswith("|")), len(table))]
    text = Path(target).read_text()
    if REPORT_BEGIN not in text or REPORT_END not in text:
        raise ValueError(f"{target}: no '{REPORT_BEGIN}' ... '{REPORT_END}' markers to put the report between")
    head, rest = text.split(REPORT_BEGIN, 1)
    write_text_atomic(target, "\n".join([head + REPORT_BEGIN, *table, REPORT_END + rest.split(REPORT_END, 1)[1]]))

