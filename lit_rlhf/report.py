"""A run report a person can look at: PNG plots of the run's own TensorBoard scalars and a
markdown summary, written to ``<log_dir>/report/`` beside the checkpoints.

- at the end of ``fit``: the ``ReportOnFitEnd`` callback (in every shipped config);
- on demand: ``lit-rlhf report RUN_DIR`` (a log directory, or a folder holding several: each
  ``version_N`` with event files gets its own report).

One PNG per group of metrics that the run logged (loss, rewards, KL, response length,
learning rate, other), one panel per metric, training and validation (``val/...``) together;
``summary.md`` lists the final and best values, links the plots and, for the online methods,
holds the last table of sampled prompts and completions.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

#: Plot groups in order: (file stem, title, regex over the metric name without its ``val/`` prefix).
GROUPS: tuple[tuple[str, str, str], ...] = (
    ("loss", "Loss", r"^loss(/|$)"),
    ("rewards", "Rewards and scores", r"^(rewards/|objective/scores|objective/best|objective/worst|score$|scores/)"),
    ("kl", "KL to the reference", r"(^|/)kl($|_|/)|objective/kl|non_score_reward"),
    ("response_length", "Response length", r"response_length"),
    ("learning_rate", "Learning rate", r"^(lr|lr-.*|learning_rate)$"),
)
#: Scalars that are bookkeeping, not measurements.
SKIP = re.compile(r"^(epoch|hp_metric|rollout/count|rollout/episodes)$")
SAMPLES_TAG = "samples"


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in the TensorBoard event files of ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_samples(log_dir: str | Path) -> str | None:
    """The last markdown table of samples an online method logged (``add_text("samples", ...)``), if any."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["tensors"] if t.split("/")[0] == SAMPLES_TAG]
    if not tags:
        return None
    event = acc.Tensors(tags[0])[-1]
    values = event.tensor_proto.string_val
    return values[0].decode("utf-8") if values else None


def group_of(tag: str) -> str:
    name = tag.removeprefix("val/")
    for stem, _, pattern in GROUPS:
        if re.search(pattern, name):
            return stem
    return "other"


def plot_group(title: str, series: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """One PNG with a panel per metric; ``val/x`` is drawn in the panel of ``x``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for tag, points in sorted(series.items()):
        panels.setdefault(tag.removeprefix("val/"), {})[tag] = points
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for tag, points in lines.items():
            steps, values = zip(*points)
            is_val = tag.startswith("val/")
            ax.plot(steps, values, marker="o" if is_val or len(points) < 20 else None, markersize=3,
                    label="val" if is_val else "train", color="tab:orange" if is_val else "tab:blue")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _method_of(log_dir: Path) -> str | None:
    config = log_dir / "config.yaml"
    if not config.exists():
        return None
    import yaml

    model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    return model.get("class_path") if isinstance(model, dict) else None


def write_report(log_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plots and ``summary.md`` of the run in ``log_dir`` (its event files) under ``out``
    (``<log_dir>/report`` by default). Returns the summary's path."""
    log_dir = Path(log_dir)
    if not list(log_dir.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"{log_dir}: no TensorBoard event files (events.out.tfevents.*) to report on")
    out = Path(out) if out else log_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    scalars = {t: p for t, p in read_scalars(log_dir).items() if p and not SKIP.match(t)}
    grouped: dict[str, dict] = {}
    for tag, points in scalars.items():
        grouped.setdefault(group_of(tag), {})[tag] = points
    titles = {stem: title for stem, title, _ in GROUPS} | {"other": "Other metrics"}
    plots = [plot_group(titles[stem], grouped[stem], out / f"{stem}.png") for stem in [*titles] if stem in grouped]

    lines = [f"# Run report: {log_dir}", ""]
    method = _method_of(log_dir)
    if method:
        lines += [f"Method: `{method}`", ""]
    lines += ["| metric | final | best | steps |", "|---|---|---|---|"]
    for tag in sorted(scalars):
        values = [v for _, v in scalars[tag]]
        better_low = re.search(r"loss|kl", tag) is not None
        best = min(values) if better_low else max(values)
        lines.append(f"| {tag} | {values[-1]:.4g} | {best:.4g} | {scalars[tag][-1][0]} |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    samples = read_samples(log_dir)
    if samples:
        lines += ["", "## Samples (last logged rollout)", "", samples]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return summary


class ReportOnFitEnd(pl.Callback):
    """Write the run report (``lit_rlhf.report.write_report``) to ``<log_dir>/report`` when ``fit`` ends."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero or log_dir is None:
            return
        for logger in trainer.loggers:
            logger.save()
            flush = getattr(getattr(logger, "experiment", None), "flush", None)
            if callable(flush):
                flush()
        if not list(Path(log_dir).glob("events.out.tfevents.*")):
            return  # another logger (W&B, CSV): its own UI is the report
        rank_zero_info(f"run report -> {write_report(log_dir)}")


def main(argv: list[str]) -> None:
    """Plots (PNG) and a markdown summary of a run from its TensorBoard logs, in <log_dir>/report."""
    parser = argparse.ArgumentParser(prog="lit-rlhf report", description=main.__doc__)
    parser.add_argument("run",
                        help="a log directory (e.g. runs/dpo/lightning_logs/version_0) or a folder above several")
    parser.add_argument("--out", default=None, help="where to write (default: <log_dir>/report)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not run.exists():
        raise FileNotFoundError(f"{run}: no such run directory")
    log_dirs = sorted({p.parent for p in run.glob("**/events.out.tfevents.*")})
    if not log_dirs:
        raise FileNotFoundError(f"{run}: no TensorBoard event files below it (events.out.tfevents.*)")
    if args.out and len(log_dirs) > 1:
        raise ValueError(f"{run} holds {len(log_dirs)} runs; --out needs exactly one")
    for log_dir in log_dirs:
        print(f"{log_dir} -> {write_report(log_dir, args.out)}")
