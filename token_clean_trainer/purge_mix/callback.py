"""`PurgeMixCallback`: purge-mix as a preprocessing step of `TokenCleanSFTTrainer`."""

import logging

from transformers import TrainerCallback

from .config import PurgeMixConfig
from .pipeline import PurgeMixResult, run_purge_mix

logger = logging.getLogger(__name__)


class PurgeMixCallback(TrainerCallback):
    """
    Runs ENTP purge-mix on the raw train dataset before the trainer tokenises it.

    Pass it in `callbacks=[PurgeMixCallback(config)]` to [`TokenCleanSFTTrainer`]: the trainer calls [`apply`] on the
    train dataset before `SFTTrainer` prepares it, so the purged and fused rows go through TRL's one tokenisation
    path. The result is cached under `<output_dir>/purge_mix/`, keyed by the rows' content, every setting and the
    models' identities: a restarted run (e.g. `resume_from_checkpoint`) loads it instead of redoing the LLM work, and
    the request cache makes a killed purge-mix resume where it stopped.

    Args:
        config ([`PurgeMixConfig`]): The purge-mix settings.
    """

    def __init__(self, config: PurgeMixConfig):
        if not isinstance(config, PurgeMixConfig):
            raise TypeError(f"`PurgeMixCallback` needs a `PurgeMixConfig`, got {type(config).__name__}.")
        self.config = config
        self.result: PurgeMixResult | None = None

    def apply(self, train_dataset, output_dir: str, seed: int = 42, model=None, tokenizer=None):
        """Return the purge-mix output for `train_dataset` (computed or loaded from the cache)."""
        if train_dataset is None:
            raise ValueError("`PurgeMixCallback` needs a `train_dataset`; the trainer was given none.")
        if isinstance(train_dataset, dict):
            raise ValueError(
                "`PurgeMixCallback` transforms one train `Dataset`, got a dict of datasets. Pass a single split."
            )
        from accelerate import PartialState

        # The main process computes; the others then find the content-keyed result on disk.
        with PartialState().main_process_first():
            self.result = run_purge_mix(
                train_dataset, self.config, output_dir, seed=seed, base_model=model, tokenizer=tokenizer
            )
        report = self.result.report
        logger.info(
            "purge-mix: train dataset %d -> %d rows (HQ %d, synthesized %d)",
            report["rows_used"],
            report["output"]["total_rows"],
            report["output"]["hq_rows"],
            report["output"]["synthesized_rows"],
        )
        if len(self.result.dataset) == 0:
            raise ValueError(
                "purge-mix left no rows to train on (no HQ rows and no accepted fusion). Lower "
                "`purge_mix_hq_min_score`, use `purge_mix_output_mode='hq_and_synthesized'` or raise "
                f"`purge_mix_max_fusions`; see {self.result.output_dir}/report.json."
            )
        return self.result.dataset
