"""The report of one trainer's run (the trainer side of the report package): what every mode adds to `build_report`, and where the report goes.

Every mode builds its report the same way (the config, TRL's row counts, the reference, the time, a sample of rows for
`tokens.html`) and publishes it the same way (`report.json`, the histogram, the terminal summary, W&B/TensorBoard);
this object holds what that needs, so the modes pass it around instead of reaching into the trainer.
"""

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..compact import ResponseLayout
from ..utils import is_peft_model
from .sample import DEFAULT_SAMPLE_ROWS, build_token_sample
from .summary import build_report
from .terminal import print_summary
from .write import write_report

logger = logging.getLogger(__name__)


class RunReport:
    """
    Builds and publishes the token-cleaning report of one run (on the main process; the others keep the log fields).

    Args:
        args ([`TokenCleanConfig`]):
            The run's config (its settings go into the report and the page).
        tokenizer:
            Renders the token sample.
        is_main (`bool`):
            Whether this process writes the report.
        prepare_stats (`dict`):
            TRL's row counts per split, filled while `SFTTrainer` prepares the data.
        describe_reference (`Callable[[], dict]`):
            The reference's description (kind and name).
        model_settings (`Callable[[], dict]`):
            The trained model's name and whether it is a PEFT model (read when the report is built).
        input_ids (`Callable[[list[int]], list[list[int]]]`):
            The token ids of rows of the dataset being reported on.
        publish_to_integrations (`Callable[[str], Any]`):
            Sends the written report to the run's trackers (`report_to`).
        seed (`int`):
            Seed of the rows sampled for `tokens.html`.
        describe_precision (`Callable[[], dict]`, *optional*):
            The dtypes each side of the score ran in (`scoring_precision` in `report.json`).
    """

    def __init__(
        self,
        args,
        tokenizer,
        is_main: bool,
        prepare_stats: dict[str, dict[str, int]],
        describe_reference: Callable[[], dict[str, Any]],
        model_settings: Callable[[], dict[str, Any]],
        input_ids: Callable[[list[int]], list[list[int]]],
        publish_to_integrations: Callable[[str], Any],
        seed: int,
        describe_precision: Callable[[], dict[str, Any]] | None = None,
    ):
        self.args = args
        self.tokenizer = tokenizer
        self.is_main = is_main
        self.prepare_stats = prepare_stats
        self.describe_reference = describe_reference
        self.model_settings = model_settings
        self.input_ids = input_ids
        self.publish_to_integrations = publish_to_integrations
        self.seed = seed
        self.describe_precision = describe_precision
        self.report: dict[str, Any] = {}  # the last one published

    @property
    def folder(self) -> str:
        return os.path.join(self.args.output_dir, "token_cleaning")

    def build(self, positions, started: float, **fields) -> dict[str, Any]:
        """
        `build_report` with what every mode shares: the config, TRL's row counts, the reference, the time.
        `positions` is a `compact.ResponseLayout` (compact arrays) or a flat `(lengths, labels, offsets, response)` tuple.
        """
        layout = positions if isinstance(positions, ResponseLayout) else None
        tokens = fields.pop("tokens", None)
        if layout is not None:
            lengths, labels, offsets, response = layout.lengths, None, layout.offsets, None
        else:
            lengths, labels, offsets, response = positions
        fields.setdefault("reference", self.describe_reference())
        report = build_report(
            args=self.args,
            lengths=lengths,
            offsets=offsets,
            labels=labels,
            response=response,
            prepare_stats=self.prepare_stats.get("train", {}),
            seconds=time.perf_counter() - started,
            tokenizer=self.tokenizer,
            layout=layout,
            **fields,
        )
        if self.describe_precision is not None:
            report["scoring_precision"] = self.describe_precision()
        if self.is_main:
            # The rows of tokens.html; written (and popped) with report.json by `write_report`.
            report["_tokens"] = tokens if tokens is not None else self.token_sample(offsets, response, fields, layout)
        return report

    def token_sample(
        self, offsets: np.ndarray, response: np.ndarray | None, fields: dict[str, Any], layout=None
    ) -> dict[str, Any]:
        """The rows of `tokens.html`, with the run's settings."""
        args = self.args
        settings = {
            **self.model_settings(),
            "max_length": args.max_length,
            "learning_rate": args.learning_rate,
            "num_train_epochs": args.num_train_epochs,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "world_size": args.world_size,
            **{
                name: getattr(args, name)
                for name in sorted(vars(args))
                if name.startswith(("token_", "ref_", "score_", "self_evolving_")) and getattr(args, name) is not None
            },
        }
        return build_token_sample(
            input_ids=self.input_ids,
            tokenizer=self.tokenizer,
            offsets=offsets,
            response=response,
            base_losses=fields.get("base_losses"),
            ref_losses=fields.get("ref_losses"),
            keep=fields.get("keep"),
            settings=settings,
            rows=getattr(args, "token_report_rows", DEFAULT_SAMPLE_ROWS),
            seed=self.seed,
            layout=layout,
        )

    def publish(self, report: dict[str, Any]) -> None:
        """Write the report, the histogram and the page, print the summary, send it to the trackers."""
        self.report = report
        if self.is_main:
            write_report(self.folder, report)
            print_summary(report, self.folder)
            self.publish_to_integrations(self.folder)
        warn_if_weak_reference(report)

    def write(self, report: dict[str, Any]) -> None:
        """Write a report that is not final yet (after a self-evolving round), main process only."""
        if self.is_main:
            write_report(self.folder, report)

    def summarise(self, report: dict[str, Any]) -> None:
        """Print a written report's summary (main process only)."""
        if self.is_main:
            print_summary(report, self.folder)

    def finish(self, report: dict[str, Any]) -> None:
        """The last report written with [`write`]: print its summary and keep it (main process; {} elsewhere)."""
        self.report = report if self.is_main else {}
        if self.is_main:
            print_summary(report, self.folder)
            warn_if_weak_reference(report)

    def last(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The report on the main process; elsewhere, the fields the training logs show."""
        return self.report if self.is_main else dict(summary)


def warn_if_weak_reference(report: dict[str, Any]) -> None:
    share = (report.get("scores") or {}).get("share_abs_below_0.01")
    if share is not None and share > 0.5:
        logger.warning(
            "%.0f%% of response tokens score within 0.01 of zero: the reference is nearly the base model, so the "
            "selection is close to random. Warm the reference up longer or with a higher learning rate (the paper: "
            "one epoch on 10k high-quality samples, LoRA r=64, lr 1e-4).",
            100 * share,
        )


def model_settings(model) -> dict[str, Any]:
    """The trained model's name and whether it is a PEFT model, for the page's settings table."""
    from ..scoring import unwrap_causal_lm  # here: it loads transformers, which the report's import does not

    return {"model": getattr(unwrap_causal_lm(model).config, "_name_or_path", None), "peft": is_peft_model(model)}


def log_fields(report: dict[str, Any]) -> dict[str, float]:
    """A static selection's statistics, as the training logs show them."""
    if "token_cleaning/kept_fraction" in report:
        # A process other than the main one holds only these fields of the report (see `RunReport.last`).
        return dict(report)
    fields = {}
    if report.get("kept_fraction") is not None:  # none for a user's weight column: nothing is kept or dropped
        fields["token_cleaning/kept_fraction"] = report["kept_fraction"]
    if report.get("threshold") is not None:
        fields["token_cleaning/threshold"] = report["threshold"]
    scores = report.get("scores") or {}
    for name in ("mean", "p10", "p50", "p90"):
        if scores.get(name) is not None:
            fields[f"token_cleaning/score_{name}"] = scores[name]
    return {**fields, **weight_log_fields(report.get("weights"))}


def weight_log_fields(weights: dict[str, Any] | None) -> dict[str, float]:
    """Soft weights (`token_weighting="soft"`): their mean and effective token fraction, as the logs show them."""
    if not weights or weights.get("mean") is None:
        return {}
    return {
        "token_cleaning/weight_mean": float(weights["mean"]),
        "token_cleaning/weight_effective_fraction": float(weights["effective_fraction"]),
    }


def step_log_fields(record: dict[str, Any]) -> dict[str, float]:
    """One step's selection statistics, as TRL's metrics buffer averages them over the steps between two logs."""
    response = record["response_tokens"]
    fields = {"token_cleaning/kept_fraction": record["kept_tokens"] / response if response else 0.0}
    if record.get("threshold") is not None:
        fields["token_cleaning/threshold"] = float(record["threshold"])
    if record.get("score_mean") is not None:
        fields["token_cleaning/score_mean"] = float(record["score_mean"])
    return {**fields, **weight_log_fields(record.get("weights"))}


def round_log_fields(record: dict[str, Any]) -> dict[str, float]:
    """A self-evolving round's selection statistics, constant through the round."""
    fields = {"token_cleaning/round": record["round"], "token_cleaning/kept_fraction": record["kept_fraction"]}
    if record.get("threshold") is not None:
        fields["token_cleaning/threshold"] = record["threshold"]
    return {**fields, **weight_log_fields(record.get("weights"))}


def load_report(output_dir: str) -> dict[str, Any]:
    """The `report.json` a token-cleaning run wrote under `<output_dir>/token_cleaning/`."""
    import json

    with open(os.path.join(output_dir, "token_cleaning", "report.json"), encoding="utf-8") as f:
        return json.load(f)
