"""Purge-mix before training: [`purge_mix_dataset`], and the [`PurgeMixCallback`] that asks `TokenCleanSFTTrainer` to
run it on its train dataset."""

import logging

from .config import PurgeMixConfig
from .pipeline import PurgeMixResult, run_purge_mix

logger = logging.getLogger(__name__)


def purge_mix_dataset(
    train_dataset, config: PurgeMixConfig, output_dir: str, seed: int = 42, model=None, tokenizer=None
) -> PurgeMixResult:
    """
    Run ENTP purge-mix on a raw train dataset before training, and return the result to train on.

    The main process computes (the others wait, then find the content-keyed result on disk), so it is safe to call in
    every process of a distributed run. The result is cached under `<output_dir>/purge_mix/`, keyed by the rows'
    content, every setting and the models' identities: a restarted run (e.g. `resume_from_checkpoint`) loads it
    instead of redoing the LLM work, and the request cache makes a killed purge-mix resume where it stopped.

    Args:
        train_dataset (`datasets.Dataset`): The raw train rows (before any tokenisation).
        config ([`PurgeMixConfig`]): The purge-mix settings.
        output_dir (`str`): The training run's output folder.
        seed (`int`, *optional*, defaults to `42`): The training seed.
        model (`PreTrainedModel` or `str`, *optional*): The model to fine-tune (scores perplexity/IFD).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Its tokenizer.

    Returns:
        [`PurgeMixResult`]: `.dataset` holds the rows to train on, `.report` the content of `report.json`.

    Raises:
        `ValueError`: If there is no train dataset, a dict of splits, or purge-mix leaves no row to train on.
    """
    if train_dataset is None:
        raise ValueError("purge-mix needs a `train_dataset`; the trainer was given none.")
    if isinstance(train_dataset, dict):
        raise ValueError("purge-mix transforms one train `Dataset`, got a dict of datasets. Pass a single split.")
    from accelerate import PartialState

    with PartialState().main_process_first():
        result = run_purge_mix(train_dataset, config, output_dir, seed=seed, base_model=model, tokenizer=tokenizer)
    report = result.report
    logger.info(
        "purge-mix: train dataset %d -> %d rows (HQ %d, synthesized %d)",
        report["rows_used"],
        report["output"]["total_rows"],
        report["output"]["hq_rows"],
        report["output"]["synthesized_rows"],
    )
    if len(result.dataset) == 0:
        raise ValueError(
            "purge-mix left no rows to train on (no HQ rows and no accepted fusion). Lower "
            "`purge_mix_hq_min_score`, use `purge_mix_output_mode='hq_and_synthesized'` or raise "
            f"`purge_mix_max_fusions`; see {result.output_dir}/report.json."
        )
    return result


class PurgeMixCallback:
    """
    Asks [`TokenCleanSFTTrainer`] to run ENTP purge-mix ([`purge_mix_dataset`]) on its raw train dataset before
    `SFTTrainer` tokenises it, so the purged and fused rows go through TRL's one tokenisation path.

    Pass it in `callbacks=[PurgeMixCallback(config)]`. It is a preprocessing request, not a `TrainerCallback` (no
    training event can replace the rows before they are tokenised): the trainer runs it in `__init__` and keeps it out
    of the callbacks it hands to `Trainer`. With another trainer, call [`purge_mix_dataset`] on the train dataset
    yourself.

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
        self.result = purge_mix_dataset(train_dataset, self.config, output_dir, seed, model, tokenizer)
        return self.result.dataset

    def __getattr__(self, name: str):
        # Reached only for attributes the class lacks: another `Trainer` calling callback events on it. Say so,
        # instead of training on rows purge-mix never saw.
        if name.startswith("on_"):
            raise TypeError(
                "`PurgeMixCallback` is run by `TokenCleanSFTTrainer` before it tokenises the train dataset; this "
                "trainer treats it as a `TrainerCallback`. Call `purge_mix_dataset(train_dataset, config, output_dir)` "
                "and pass its `.dataset` as the train dataset instead."
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
