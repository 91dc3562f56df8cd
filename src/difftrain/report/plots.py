"""The run report's plots, drawn from metrics.jsonl with matplotlib: PNG bytes per plot.

    plots = draw_plots(read_metrics(Path("runs/x/metrics.jsonl")))   # [Plot, ...]

matplotlib is imported here only, when a report is made (`pip install matplotlib` or
`difftrain[report]`), and through its object API (`Figure`, which renders with Agg): the
global pyplot backend of a process that embeds difftrain is left alone.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from difftrain.errors import UserError
from difftrain.report.run_facts import Metrics

INSTALL_HINT = "pip install matplotlib (or pip install 'difftrain[report]')"
FIG_SIZE = (7.0, 3.0)  # inches; 100 dpi -> 700 x 300 px, readable in a card and a page
DPI = 100
MARKERS_UP_TO = 60  # points drawn as dots too while few enough to tell apart
PLOTS_FOLDER = "report"  # RUN_DIR/report/<plot>.png, linked from the page and the model card


@dataclass
class Plot:
    name: str  # file stem under RUN_DIR/report/
    title: str
    png: bytes | None  # None: no data, `note` says why
    note: str

    @property
    def filename(self) -> str:
        return f"{self.name}.png"

    @property
    def link(self) -> str:
        """The plot file's path relative to RUN_DIR (report.html and README.md sit there)."""
        return f"{PLOTS_FOLDER}/{self.filename}"


def require_matplotlib():
    """matplotlib's Figure class, or a UserError that names the install command."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(
            f"`difftrain report RUN_DIR` draws its plots with matplotlib, which is not "
            f"installed: {INSTALL_HINT}"
        ) from None
    return Figure


def smoothing_factor(points: int) -> float:
    """EMA factor giving a window of about 2% of the run (0.6 for short runs, at most 0.99):
    a diffusion loss is noisy step to step (a random timestep per sample)."""
    return round(min(0.99, max(0.6, 1.0 - 50.0 / max(points, 1))), 2)


def ema(values: list[float], factor: float) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard's smoothing), so the first
    points are not pulled towards zero."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = factor * average + (1.0 - factor) * value
        smoothed.append(average / (1.0 - factor**count))
    return smoothed


def non_finite_note(steps: list[int]) -> str:
    if not steps:
        return ""
    shown = ", ".join(str(s) for s in steps[:10]) + (" ..." if len(steps) > 10 else "")
    return f" {len(steps)} non-finite values not drawn (steps {shown})."


def render(figure_class, title: str, ylabel: str, lines: list[tuple], span: tuple) -> bytes:
    """PNG bytes of one plot; `lines` are (steps, values, label, style kwargs); `span` is the
    run's (first, last) step, the same x range on every plot so they line up."""
    from matplotlib.ticker import MaxNLocator

    figure = figure_class(figsize=FIG_SIZE, dpi=DPI, layout="constrained")
    axes = figure.subplots()
    for steps, values, label, style in lines:
        marker = "o" if len(steps) <= MARKERS_UP_TO else None
        axes.plot(steps, values, label=label, marker=marker, markersize=3, **style)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "step 2.5" ticks
    pad = max(0.5, 0.02 * (span[1] - span[0]))
    axes.set_xlim(span[0] - pad, span[1] + pad)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    if len(lines) > 1:
        axes.legend()
    buffer = io.BytesIO()
    # No "Software" stamp: the same metrics give the same bytes across matplotlib versions.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def try_render(figure_class, title: str, ylabel: str, lines: list[tuple], span: tuple):
    """(PNG bytes, "") or, for values matplotlib cannot draw (a loss of 1e308 beside -1e308,
    a step beyond a float), (None, why): the page and the card say so instead."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow on the way there
            return render(figure_class, title, ylabel, lines, span), ""
    except (ArithmeticError, ValueError) as exc:
        return None, (
            f"Not drawn: the values or steps are out of the range a plot can show "
            f"({type(exc).__name__}: {exc})."
        )


def step_span(metrics: Metrics) -> tuple[int, int]:
    steps = [row["step"] for row in metrics.rows] or [0]
    return steps[0], steps[-1]


def loss_plot(figure_class, metrics: Metrics) -> Plot:
    steps, values, bad = metrics.series("loss")
    if not steps:
        return Plot(
            "loss", "Training loss", None, "No training loss recorded." + non_finite_note(bad)
        )
    factor = smoothing_factor(len(values))
    lines = [
        (steps, values, "loss (raw)", {"alpha": 0.35, "color": "C0"}),
        (steps, ema(values, factor), f"EMA, factor {factor}", {"color": "C0", "linewidth": 2}),
    ]
    png, failure = try_render(figure_class, "Training loss", "loss", lines, step_span(metrics))
    note = failure or (
        f"Raw loss per step (light) and its exponential moving average with smoothing factor "
        f"{factor}, debiased (dark)."
    )
    return Plot("loss", "Training loss", png, note + non_finite_note(bad))


def simple_plot(
    figure_class, metrics: Metrics, key: str, title: str, missing: str, note: str
) -> Plot:
    steps, values, bad = metrics.series(key)
    if not steps:
        return Plot(key, title, None, missing + non_finite_note(bad))
    line = (steps, values, key, {"color": "C0"})
    png, failure = try_render(figure_class, title, key, [line], step_span(metrics))
    return Plot(key, title, png, (failure or note) + non_finite_note(bad))


def draw_plots(metrics: Metrics) -> list[Plot]:
    """Loss (raw and smoothed), learning rate, gradient norm and validation loss by step."""
    figure_class = require_matplotlib()
    return [
        loss_plot(figure_class, metrics),
        simple_plot(
            figure_class, metrics, "lr", "Learning rate", "No learning rate recorded.",
            "Learning rate at each optimizer step.",
        ),
        simple_plot(
            figure_class, metrics, "grad_norm", "Gradient norm",
            "No gradient norm recorded (it is null with train.max_grad_norm 0 and on "
            "skipped steps).",
            "Norm of the gradients before clipping, per optimizer step.",
        ),
        simple_plot(
            figure_class, metrics, "val_loss", "Validation loss",
            "No validation loss recorded (set validation.loss_every_steps and "
            "validation.loss_dir to get one).",
            "Loss on the held-out images at fixed timesteps and noise, comparable across steps.",
        ),
    ]  # fmt: skip
