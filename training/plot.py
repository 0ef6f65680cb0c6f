"""``python -m training plot RUN_DIR | CHECKPOINT``: a run's training curves and conv1 kernels, as PNGs.

curves.png: loss, top-1 and top-5 error over epochs, with the learning-rate drops and the best epoch marked.
filters.png: the 96 conv1 kernels as the paper's Fig. 3 draws them, tower 0's above tower 1's.
The training job redraws both after an epoch. matplotlib is optional (``pip install -e '.[train]'``).
Without it ``plot`` says so and exits 2, and training goes on without the picture.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from model.files import atomic_path

from .errors import TrainingError

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
FILTERS_FILE = "filters.png"
INSTALL_HINT = "pip install matplotlib (or pip install -e '.[train]')"

# (panel title, [(record key, legend, style)]): training grey, validation blue, 10 patches teal and dashed.
TRAIN, VAL, TEN = "#7a8491", "#2f6fde", "#0f9d8a"
LR_DROP = "#c2410c"
PANELS = [
    (
        "loss",
        [
            ("train_loss", "train", {"color": TRAIN}),
            ("val_loss", "val, centre crop", {"color": VAL}),
            ("val_ten_crop_loss", "val, 10 patches", {"color": TEN, "linestyle": "--"}),
        ],
    ),
    (
        "top-1 error",
        [
            ("train_top1_error", "train (augmented crops)", {"color": TRAIN}),
            ("val_top1_error", "val, centre crop", {"color": VAL}),
            ("val_ten_crop_top1_error", "val, 10 patches", {"color": TEN, "linestyle": "--"}),
        ],
    ),
    (
        "top-5 error",
        [
            ("val_top5_error", "val, centre crop", {"color": VAL}),
            ("val_ten_crop_top5_error", "val, 10 patches", {"color": TEN, "linestyle": "--"}),
        ],
    ),
]
PLOTTED = [key for _, series in PANELS for key, _, _ in series] + ["lr"]


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, checked: one JSON object per line with an epoch and numeric values."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TrainingError(
            f"{path} does not exist: no epoch of this run has finished yet, or this is not a run folder"
        ) from None
    except IsADirectoryError:
        raise TrainingError(f"{path} is a directory, not a metrics file") from None
    except UnicodeDecodeError:
        raise TrainingError(f"{path} is not a text file (one JSON object per line expected)") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingError(f"{path}, line {number}: not JSON ({e.msg}); the file is damaged") from None
        if not isinstance(record, dict) or not _is_number(record.get("epoch")):
            raise TrainingError(f"{path}, line {number}: not a metrics record (a JSON object with an 'epoch')")
        for key in PLOTTED:
            if record.get(key) is not None and not _is_number(record[key]):
                raise TrainingError(f"{path}, line {number}: {key} is {record[key]!r}, not a number")
        records.append(record)
    if not records:
        raise TrainingError(f"{path} is empty: no epoch of this run has finished yet")
    return records


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> list[Path]:
    """Draw RUN_DIR/metrics.jsonl into ``output`` (default RUN_DIR/curves.png), and the kernels of
    RUN_DIR/last.safetensors, when there is one, into RUN_DIR/filters.png. Given a checkpoint file instead,
    draw its kernels into ``output`` (default beside it: <name>.filters.png). Returns the PNGs written."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.suffix == ".safetensors":
        return [plot_filters(run_dir, Path(output) if output else run_dir.with_suffix(".filters.png"))]
    if not run_dir.is_dir():
        raise TrainingError(
            f"{run_dir}: no such directory (expected a run folder, the --out of train, or a .safetensors checkpoint)"
        )
    records = read_metrics(run_dir / METRICS_FILE)
    written = [plot_metrics(records, Path(output) if output else run_dir / CURVES_FILE, title=run_dir.resolve().name)]
    if (run_dir / "last.safetensors").is_file():
        written.append(plot_filters(run_dir / "last.safetensors", run_dir / FILTERS_FILE))
    return written


def plot_filters(checkpoint_path: Path, output: Path) -> Path:
    """The kernels of a checkpoint file (the paper's Fig. 3) into the PNG ``output``, atomically.
    An unusable checkpoint raises model.CheckpointError (the command's exit status 1)."""
    from model import load_checkpoint

    return save_filters(load_checkpoint(checkpoint_path), output)


def save_filters(checkpoint, output: Path) -> Path:
    from model.visualize import filters_image

    image = filters_image(checkpoint.state_dict["conv1.weight"], checkpoint.preprocessing.channel_order)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        image.save(tmp, format="PNG")
    return output


def plot_metrics(records: list[dict], output: Path, *, title: str = "") -> Path:
    """Draw the curves of ``records`` (metrics.jsonl's lines) into the PNG ``output``, atomically."""
    figure = draw_figure(records, title=title)
    output = Path(output)
    with atomic_path(output) as tmp:
        figure.savefig(tmp, format="png")
    return output


def draw_figure(records: list[dict], *, title: str = ""):
    """The matplotlib Figure of ``records``' curves (what plot_metrics saves), laid out and ready to save."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend or state
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise TrainingError(f"drawing the curves needs matplotlib: {INSTALL_HINT}") from None

    epochs = [r["epoch"] for r in records]
    marker = "o" if len(records) <= 40 else None
    figure = Figure(figsize=(14, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # a PNG canvas of its own (text extents for placing labels); no global backend
    axes = figure.subplots(1, len(PANELS), sharex=True)
    lr_labels = []
    for ax, (name, series) in zip(axes, PANELS):
        for key, legend, style in series:
            values = [_value(r, key) for r in records]
            if all(math.isnan(v) for v in values):
                continue  # e.g. no 10-patch evaluation during this run
            ax.plot(epochs, values, label=legend, marker=marker, markersize=3.5, linewidth=1.6, **style)
        ax.set_title(name, loc="left", fontsize=11, fontweight="bold")
        ax.set_xlabel("epoch")
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)  # whole epochs on the axis, even for one
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        low, high = ax.get_ylim()
        if low < 0:  # losses and errors are never negative (a single point gets a symmetric margin)
            ax.set_ylim(0, max(high, 0.05))
        if name != "loss":
            ax.yaxis.set_major_formatter(_percent_formatter())
        ax.grid(True, color="#e3e6ea", linewidth=0.8)
        ax.spines[["top", "right"]].set_visible(False)
        for position, lr in lr_drops(records):
            ax.axvline(position, color=LR_DROP, linestyle=":", linewidth=1.4)
            if name == "loss":
                lr_labels.append(
                    ax.annotate(
                        f"lr → {lr:g}" if lr is not None else "lr ÷",
                        xy=(position, 1),
                        xycoords=("data", "axes fraction"),
                        xytext=(LABEL_GAP, -LABEL_GAP),
                        textcoords="offset points",
                        va="top",
                        fontsize=LABEL_SIZE,
                        color=LR_DROP,
                        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"},
                    )
                )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False)

    best = _best(records)
    if best is not None:
        axes[1].plot(
            [best["epoch"]], [best["val_top1_error"]], marker="*", markersize=13, color="#e0a100", linestyle="none"
        )
    figure.suptitle(_headline(records, best, title), x=0.01, ha="left", fontsize=12)
    if lr_labels:
        _place_lr_labels(figure, axes[0], lr_labels)
    return figure


LABEL_SIZE = 8  # points: the lr-drop labels
LABEL_GAP = 3  # points between a label and its dotted line (and the top of the panel)


def _place_lr_labels(figure, ax, labels) -> None:
    """Keep the lr-drop labels apart: each goes right of its line (left of it where it would leave the panel),
    in the highest row where it reaches neither a label already placed nor that label's line; close drops
    thus stack downwards."""
    figure.draw_without_rendering()  # the constrained layout fixes the panel's size: text extents in pixels
    renderer = figure.canvas.get_renderer()
    points = figure.dpi / 72  # pixels per point
    pad = (LABEL_GAP + 1) * points  # a label ends before the next label's line
    row_height = LABEL_SIZE * 1.35 * points
    panel_right = ax.get_window_extent(renderer).x1
    rows: list[list[tuple[float, float]]] = []  # per row, the pixel spans (x0, x1) taken
    for label in labels:
        box = label.get_window_extent(renderer)
        width, line_x = box.width, box.x0 - LABEL_GAP * points
        if box.x1 > panel_right:  # would run into the next panel: put it on the line's left
            label.set_horizontalalignment("right")
            span = (line_x - LABEL_GAP * points - width, line_x - LABEL_GAP * points)
            x_offset = -LABEL_GAP
        else:
            span, x_offset = (box.x0, box.x1), LABEL_GAP
        row = next(
            (i for i, taken in enumerate(rows) if all(span[0] > b + pad or span[1] < a - pad for a, b in taken)),
            len(rows),
        )
        if row == len(rows):
            rows.append([])
        rows[row].append(span)
        label.xyann = (x_offset, -LABEL_GAP - row * row_height / points)


def _percent_formatter():
    """Percent tick labels with as many decimals as the ticks' spacing needs (0.5 % steps → 93.5 %), so that
    every label reads its tick's value and no two read the same."""
    from matplotlib.ticker import PercentFormatter

    class Percent(PercentFormatter):
        def set_locs(self, locs):
            super().set_locs(locs)
            self.decimals = _decimals_for([100 * v for v in locs])

    return Percent(xmax=1, decimals=0)


def _decimals_for(values: list[float], most: int = 6) -> int:
    """The fewest decimals that write each of ``values`` exactly (ticks are round numbers), else distinctly."""
    for decimals in range(most + 1):
        if all(abs(round(v, decimals) - v) < 1e-6 for v in values):
            return decimals
    for decimals in range(most + 1):
        if len({f"{v:.{decimals}f}" for v in values}) == len(set(values)):
            return decimals
    return most


def lr_drops(records: list[dict]) -> list[tuple[float, float | None]]:
    """Where the learning rate was divided: (epoch + 0.5, the new lr or None when the run has not gone on)."""
    drops = []
    for i, record in enumerate(records):
        following = records[i + 1] if i + 1 < len(records) else None
        lr, next_lr = record.get("lr"), following.get("lr") if following else None
        dropped = record.get("lr_dropped_after") or (lr is not None and next_lr is not None and next_lr < lr)
        if dropped:
            drops.append((record["epoch"] + 0.5, next_lr))
    return drops


def write_curves(run_dir: Path, records: list[dict]) -> str | None:
    """For the training loop: redraw RUN_DIR/curves.png. A picture must never stop training, so any
    problem comes back as a one-line note (None when the PNG was written)."""
    try:
        plot_metrics(records, run_dir / CURVES_FILE, title=run_dir.resolve().name)
    except TrainingError as e:  # matplotlib missing
        return f"note: no {CURVES_FILE}: {e}"
    except Exception as e:  # noqa: BLE001 — a bug or a full disk in plotting is reported, never raised
        return f"note: could not draw {CURVES_FILE}: {type(e).__name__}: {e}"
    return None


def write_filters(run_dir: Path, checkpoint) -> str | None:
    """For the training loop: redraw RUN_DIR/filters.png from this epoch's checkpoint; a problem is a note."""
    try:
        save_filters(checkpoint, run_dir / FILTERS_FILE)
    except Exception as e:  # noqa: BLE001 — as write_curves: a picture never stops training
        return f"note: could not draw {FILTERS_FILE}: {type(e).__name__}: {e}"
    return None


def _headline(records: list[dict], best: dict | None, title: str) -> str:
    parts = [title] if title else []
    parts.append(f"{len(records)} epoch{'s' if len(records) != 1 else ''}")
    if records[0].get("lr") is not None:
        parts.append(f"lr {records[0]['lr']:g}")
    if best is not None:
        parts.append(f"best val top-1 error {best['val_top1_error']:.1%} (epoch {best['epoch']:g})")
    return " · ".join(parts)


def _best(records: list[dict]) -> dict | None:
    scored = [r for r in records if r.get("val_top1_error") is not None and math.isfinite(r["val_top1_error"])]
    return min(scored, key=lambda r: r["val_top1_error"]) if scored else None


def _value(record: dict, key: str) -> float:
    value = record.get(key)
    return float("nan") if value is None else float(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
