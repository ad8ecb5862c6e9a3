"""What a Hub upload of a token-cleaning run may contain, and the model card's token-cleaning section.

`Trainer.push_to_hub` uploads the whole `output_dir`. A token-cleaning run also writes there what must not leave the
machine by default: verbatim training rows (`token_cleaning/tokens_sample.json`, `tokens.html`), purge-mix's rebuilt
dataset and LLM request cache, the warmed-up reference, self-evolving round checkpoints and `token-clean score`
output. [`hub_ignore_patterns`] lists them; [`ignoring_on_hub_upload`] adds them to every `upload_folder` call the
trainer makes (at the `huggingface_hub` boundary, so TRL's and transformers' own push logic is unchanged).
"""

import contextlib
import os
import textwrap
from typing import Any

TOKEN_CLEANING_PAPER = {
    "title": "Token Cleaning: Fine-Grained Data Selection for LLM Supervised Fine-Tuning",
    "id": "2502.01968",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @inproceedings{pang2025token,
            title        = {{Token Cleaning: Fine-Grained Data Selection for LLM Supervised Fine-Tuning}},
            author       = {Jinlong Pang and Na Di and Zhaowei Zhu and Jiaheng Wei and Hao Cheng and Chen Qian and Yang Liu},
            year         = 2025,
            booktitle    = {Forty-second International Conference on Machine Learning, {ICML} 2025},
            eprint       = {2502.01968},
            archivePrefix = {arXiv},
        }"""),
}

# Relative to `output_dir`. huggingface_hub matches with fnmatch, where `*` also crosses `/`, so `folder/*` is the
# whole subtree.
PRIVATE_OUTPUT_PATTERNS = (
    "token_cleaning/*",  # report, tokens_sample.json (verbatim rows), tokens.html, score histogram
    "purge_mix/*",  # rebuilt dataset, every scored input row, fusion attempts, the LLM request cache
    "reference/*",  # the warmed-up reference adapter or model (trained on the warm-up split)
    "self_evolving/*",  # round checkpoints with their keep masks
    "token_scores/*",  # `token-clean score` output: per-token scores and the token ids of every row
    "token_scores.parquet",
    ".tmp-*",  # leftovers of an interrupted atomic write
    "*/.tmp-*",
    ".*.tmp-*",  # a folder killed while being built (e.g. a purge-mix dataset under `purge_mix_output`)
    "*/.*.tmp-*",
)


def hub_ignore_patterns(output_dir: str, extra_dirs: tuple[str | None, ...] = ()) -> list[str]:
    """
    Patterns, relative to `output_dir`, that a Hub upload of `output_dir` must skip.

    Args:
        output_dir (`str`):
            The folder being uploaded.
        extra_dirs (`tuple[str | None, ...]`, *optional*):
            Folders that hold data-derived files wherever the user put them (e.g. `score_cache_dir`); those inside
            `output_dir` are added.
    """
    patterns = list(PRIVATE_OUTPUT_PATTERNS)
    root = os.path.realpath(output_dir)
    for folder in extra_dirs:
        if not folder:
            continue
        relative = os.path.relpath(os.path.realpath(folder), root)
        if relative == ".":
            raise ValueError(
                f"`score_cache_dir` is the output directory itself ({output_dir}); a Hub upload would publish the "
                "score cache. Point `score_cache_dir` to a sub-folder or elsewhere."
            )
        if not relative.startswith(".."):
            relative = relative.replace(os.sep, "/")
            patterns += [relative, f"{relative}/*"]
    return patterns


class _IgnoringHfApi:
    """An `HfApi` whose `upload_folder` always skips `patterns` as well as the caller's."""

    def __init__(self, api, patterns: list[str]):
        self._api = api
        self._patterns = patterns

    def upload_folder(self, *args, **kwargs):
        given = kwargs.get("ignore_patterns") or []
        given = [given] if isinstance(given, str) else list(given)
        kwargs["ignore_patterns"] = [*given, *(p for p in self._patterns if p not in given)]
        return self._api.upload_folder(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._api, name)


@contextlib.contextmanager
def ignoring_on_hub_upload(patterns: list[str]):
    """Within the block, every `upload_folder` that `transformers.Trainer` makes also skips `patterns`."""
    import transformers.trainer as trainer_module

    original = trainer_module.hf_api
    trainer_module.hf_api = lambda: _IgnoringHfApi(original(), patterns)
    try:
        yield
    finally:
        trainer_module.hf_api = original


def cleaning_card_section(args, report: dict[str, Any] | None) -> str:
    """The model card's "Token cleaning" section: the settings and, when known, the kept fraction. No data, no paths."""
    lines = [
        "## Token cleaning",
        "",
        f"Trained with [token cleaning](https://huggingface.co/papers/{TOKEN_CLEANING_PAPER['id']}): every response "
        "token is scored `L_base - L_ref` (its loss under the base model minus under a reference model) and only the "
        "highest-scoring share stays in the loss.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| `token_cleaning` | `{args.token_cleaning}` |",
        f"| `token_selection` | `{args.token_selection}` |",
        f"| `token_keep_ratio` | {args.token_keep_ratio} |",
    ]
    if args.token_cleaning == "self_evolving":
        lines += [
            f"| `self_evolving_rounds` | {args.self_evolving_rounds} |",
            f"| `self_evolving_schedule` | `{args.self_evolving_schedule}` |",
        ]
    elif args.ref_adapter_name_or_path:
        lines.append("| reference | a LoRA adapter on the same base |")
    elif args.ref_model_name_or_path:
        lines.append("| reference | a full model |")
    if args.token_selection == "random":
        seed = args.token_selection_seed if args.token_selection_seed is not None else args.seed
        lines.append(f"| `token_selection_seed` | {seed} |")
    if report:
        if report.get("response_tokens") is not None:
            lines.append(f"| response tokens | {report['response_tokens']:,} |")
        if report.get("kept_tokens") is not None:
            lines.append(f"| kept tokens | {report['kept_tokens']:,} |")
        if report.get("kept_fraction") is not None:
            lines.append(f"| kept fraction | {report['kept_fraction']:.4f} |")
        if report.get("threshold") is not None:
            lines.append(f"| score threshold (nats) | {report['threshold']:.4f} |")
    lines += [
        "",
        "The per-token report (with sample rows of the training data) stays on the training machine under "
        "`token_cleaning/`; it is not part of this upload.",
        "",
    ]
    return "\n".join(lines)


def read_report(output_dir: str) -> dict[str, Any] | None:
    """[`load_report`], or `None` when the run wrote no report."""
    from .report.run import load_report

    try:
        return load_report(output_dir)
    except FileNotFoundError:
        return None


def add_cleaning_section(card_path: str, section: str) -> None:
    """Insert `section` before the card's "## Citations" heading (or append it), replacing an earlier one."""
    with open(card_path, encoding="utf-8") as f:
        card = f.read()
    start = card.find("## Token cleaning\n")
    if start != -1:  # a second push: replace the section
        end = card.find("\n## ", start + 1)
        card = card[:start] + (card[end + 1 :] if end != -1 else "")
    anchor = card.find("## Citations")
    card = card[:anchor] + section + "\n" + card[anchor:] if anchor != -1 else card.rstrip("\n") + "\n\n" + section
    with open(card_path, "w", encoding="utf-8") as f:
        f.write(card)


class HubUploadMixin:
    """
    The Hub side of [`TokenCleanSFTTrainer`]: uploads skip [`hub_ignore_patterns`], and the model card cites the
    paper and gets the token-cleaning section.

    Put it before the trainer class (`class TokenCleanSFTTrainer(HubUploadMixin, SFTTrainer)`): every method calls
    `super()`. It reads `self.args` (`output_dir`, `score_cache_dir` and the cleaning fields),
    `self.token_cleaning_enabled`, `self.token_cleaning_state` and `self.is_world_process_zero()`.
    """

    _paper = TOKEN_CLEANING_PAPER

    def hub_ignore_patterns(self) -> list[str]:
        """Paths under `output_dir` that `push_to_hub` (and `save_model` with `push_to_hub=True`) never upload."""
        return hub_ignore_patterns(self.args.output_dir, (self.args.score_cache_dir,))

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs):
        """
        As [`~transformers.Trainer.push_to_hub`], without the token-cleaning artefacts that hold training data.

        Token samples (`token_cleaning/`), purge-mix data and caches, the warmed-up reference, self-evolving round
        checkpoints, `token-clean score` output and a score cache inside `output_dir` are skipped (see
        [`hub_ignore_patterns`]). The model card gets the paper's citation, the cleaning settings and the kept fraction.
        """
        with ignoring_on_hub_upload(self.hub_ignore_patterns()):
            return super().push_to_hub(commit_message=commit_message, blocking=blocking, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # `hub_strategy` pushes during training upload `output_dir` too.
        with ignoring_on_hub_upload(self.hub_ignore_patterns()):
            super()._push_from_checkpoint(checkpoint_folder)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        card = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not self.token_cleaning_enabled or not os.path.isfile(card):
            return
        report = self.token_cleaning_state.report if self.token_cleaning_state is not None else None
        add_cleaning_section(card, cleaning_card_section(self.args, report or read_report(self.args.output_dir)))
