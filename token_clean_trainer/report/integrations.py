"""The token-cleaning report in the experiment trackers of `report_to`: Weights & Biases and TensorBoard.

transformers' own callbacks (`WandbCallback`, `TensorBoardCallback`) own the tracker runs; this module sends through
them what the report files hold:

- the summary scalars of `report.json` (kept fraction, threshold, score quantiles, near-zero shares, ...) under
  `token_cleaning/`: W&B run summary and TensorBoard scalars;
- the score histogram (`score_histogram.json`, one per self-evolving round): `wandb.Histogram` and TensorBoard's
  `add_histogram_raw`;
- W&B only: the `tokens.html` page as `wandb.Html`; TensorBoard gets the terminal summary as text instead.

The report is written when scoring ends, before `Trainer.train` has started the trackers; what cannot be sent yet is
sent by a one-shot callback at `on_train_begin`, after the tracker callbacks (they come first in the callback list).
Nothing here imports `wandb` or `tensorboard`: the callbacks hold the modules.
"""

import json
import logging
import os
from typing import Any

from transformers import TrainerCallback

from .histogram import HISTOGRAM_DATA_FILE
from .terminal import summary_lines
from .tokens_html import HTML_FILE

logger = logging.getLogger(__name__)

PREFIX = "token_cleaning/"
# Numeric report fields sent as summary scalars (None and missing fields are skipped).
REPORT_SCALARS = (
    "ratio",
    "threshold",
    "response_tokens",
    "kept_tokens",
    "kept_fraction",
    "rows",
    "rows_all_masked",
    "rows_without_response",
    "rows_response_truncated",
    "base_loss_mean",
    "ref_loss_mean",
    "score_seconds",
)
SCORE_SCALARS = (
    "mean",
    "std",
    "p10",
    "p50",
    "p90",
    "share_abs_below_0.01",
    "share_within_0.01_of_threshold",
    "share_negative",
    "kept_mean",
    "dropped_mean",
)


def report_scalars(report: dict[str, Any]) -> dict[str, float]:
    """The report's summary numbers as flat `token_cleaning/<name>` scalars."""
    scalars: dict[str, float] = {}
    for name in REPORT_SCALARS:
        value = report.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            scalars[PREFIX + name] = float(value)
    for name in SCORE_SCALARS:
        value = (report.get("scores") or {}).get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            scalars[f"{PREFIX}score_{name}"] = float(value)
    band = report.get("threshold_band") or {}
    if band:
        scalars[PREFIX + "threshold_in_near_zero_band"] = float(bool(band.get("in_near_zero_band")))
    return scalars


def load_payload(folder: str) -> dict[str, Any]:
    """What the trackers receive, read from a run's `token_cleaning/` folder (files that are missing are skipped)."""
    with open(os.path.join(folder, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    payload: dict[str, Any] = {
        "scalars": report_scalars(report),
        "summary": "\n".join(summary_lines(report)),
        "histograms": [],
        "html": None,
    }
    path = os.path.join(folder, HISTOGRAM_DATA_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            histogram = json.load(f)
        scores = report.get("scores") or {}
        for panel in histogram.get("panels", []):
            if panel.get("counts"):
                name = "score_histogram" if len(histogram["panels"]) == 1 else f"score_histogram/{panel['label']}"
                payload["histograms"].append(
                    {"tag": PREFIX + name.replace(" ", "_"), "panel": panel, "scores": scores}
                )
    path = os.path.join(folder, HTML_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            payload["html"] = f.read()
    return payload


# ---------------------------------------------------------------------------------------------------------------------
# One sender per tracker
# ---------------------------------------------------------------------------------------------------------------------


def _wandb_ready(callback) -> bool:
    wandb = getattr(callback, "_wandb", None)
    return wandb is not None and getattr(callback, "_initialized", False) and getattr(wandb, "run", None) is not None


def send_to_wandb(wandb, payload: dict[str, Any], step: int) -> None:
    """Scalars into the run summary; histogram(s) and the page logged at `step` (W&B's step metric for Trainer)."""
    wandb.run.summary.update(payload["scalars"])
    logged: dict[str, Any] = {}
    for item in payload["histograms"]:
        panel = item["panel"]
        logged[item["tag"]] = wandb.Histogram(np_histogram=(panel["counts"], panel["edges"]))
    if payload["html"] is not None:
        logged[PREFIX + "tokens"] = wandb.Html(payload["html"])
    if logged:
        wandb.log({**logged, "train/global_step": step})


def _tensorboard_ready(callback) -> bool:
    return getattr(callback, "tb_writer", None) is not None


def send_to_tensorboard(writer, payload: dict[str, Any], step: int) -> None:
    """Scalars, histogram(s) (`add_histogram_raw` from the stored bins) and the terminal summary as text."""
    for tag, value in payload["scalars"].items():
        writer.add_scalar(tag, value, step)
    for item in payload["histograms"]:
        panel, scores = item["panel"], item["scores"]
        counts, edges = panel["counts"], panel["edges"]
        total = sum(counts)
        centres = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
        # The run's exact moments when the panel covers all scores; else those of the bins.
        exact = panel.get("count") == scores.get("count") and scores.get("mean") is not None
        mean = scores["mean"] if exact else sum(c * x for c, x in zip(counts, centres)) / max(total, 1)
        square = (
            scores["std"] ** 2 + mean**2 if exact else sum(c * x * x for c, x in zip(counts, centres)) / max(total, 1)
        )
        writer.add_histogram_raw(
            tag=item["tag"],
            min=edges[0],
            max=edges[-1],
            num=total,
            sum=mean * total,
            sum_squares=square * total,
            bucket_limits=edges[1:],
            bucket_counts=counts,
            global_step=step,
        )
    # Markdown: indent by four spaces so TensorBoard shows the aligned table as code.
    writer.add_text(PREFIX + "summary", "\n".join("    " + line for line in payload["summary"].splitlines()), step)
    writer.flush()


def _trackers(trainer) -> list[tuple[str, Any]]:
    from transformers.integrations import TensorBoardCallback, WandbCallback

    found = []
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, WandbCallback):
            found.append(("wandb", callback))
        elif isinstance(callback, TensorBoardCallback):
            found.append(("tensorboard", callback))
    return found


def _send(kind: str, callback, payload: dict[str, Any], step: int) -> None:
    try:
        if kind == "wandb":
            send_to_wandb(callback._wandb, payload, step)
        else:
            send_to_tensorboard(callback.tb_writer, payload, step)
    except Exception as error:  # a tracker failure must not stop training; the files are on disk
        logger.warning("Could not send the token-cleaning report to %s: %s", kind, error)


class _SendAtTrainBegin(TrainerCallback):
    """Sends a report to trackers that were not started yet, once, when training begins."""

    def __init__(self, pending: list[tuple[str, Any]], payload: dict[str, Any]):
        self.pending = pending
        self.payload = payload

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            for kind, callback in self.pending:
                ready = _wandb_ready(callback) if kind == "wandb" else _tensorboard_ready(callback)
                if ready:
                    _send(kind, callback, self.payload, state.global_step)
                else:
                    logger.warning("The %s tracker did not start; the token-cleaning report stays on disk.", kind)
        self.pending = []


def publish_to_integrations(trainer, folder: str) -> list[str]:
    """
    Send the report in `folder` (a run's `token_cleaning/`) to the trainer's W&B and TensorBoard callbacks.

    Trackers already running get it now, at the trainer's current step; the others when training begins. Main process
    only. Returns the names of the trackers sent to now.
    """
    if not trainer.accelerator.is_main_process:
        return []
    trackers = _trackers(trainer)
    if not trackers or not os.path.isfile(os.path.join(folder, "report.json")):
        return []
    payload = load_payload(folder)
    sent, pending = [], []
    for kind, callback in trackers:
        ready = _wandb_ready(callback) if kind == "wandb" else _tensorboard_ready(callback)
        if ready:
            _send(kind, callback, payload, trainer.state.global_step)
            sent.append(kind)
        else:
            pending.append((kind, callback))
    if pending:
        # Replaces a callback of an earlier report that never fired (e.g. scoring ran twice before training).
        for old in [c for c in trainer.callback_handler.callbacks if isinstance(c, _SendAtTrainBegin)]:
            trainer.callback_handler.remove_callback(old)
        trainer.add_callback(_SendAtTrainBegin(pending, payload))
    return sent
