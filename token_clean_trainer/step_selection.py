"""Selection within one optimizer step: the `"batch"` level of fixed mode and the online (Rho-1 style) mode.

An optimizer step is made of the micro-batches of every process (gradient accumulation x data parallelism). The
trainer collects all of them before the first forward of the step (`Trainer.get_batch_samples`), so the kept tokens
can be ranked across the whole step and their labels set to `-100` before `num_items_in_batch` is counted: the loss is
then the mean over the kept tokens of the step, exactly as if those labels had been masked in the data.

Scores are `(B, T)` float tensors aligned with `labels` (label position `j` holds the score of predicting token `j`),
NaN where a position is not a response token. Pure torch/numpy, no model and no global random state.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .columns import DROPPED_LABELS_KEY, TOKEN_REF_LOSSES_COLUMN, TOKEN_SCORES_COLUMN, TOKEN_WEIGHTS_COLUMN
from .rules import DEFAULT_RULE, Quantities, Rule, check_score_rule, excess_loss
from .rules.soft import weight_summary
from .selection import dropped_runs, span_starts

# Gathers one 2-D float array `(channels, n_local)` from every process; returns them in rank order and this rank.
GatherFn = Callable[[np.ndarray], tuple[list[np.ndarray], int]]


def single_process_gather(local: np.ndarray) -> tuple[list[np.ndarray], int]:
    return [local], 0


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions that are trained (label not `-100`); position 0 never is, since nothing predicts it."""
    mask = labels != -100
    mask[:, 0] = False
    return mask


def rows_to_padded(values: Sequence[Sequence[float]], attention_mask: torch.Tensor) -> torch.Tensor:
    """
    Place one float sequence per row at that row's real-token positions of a padded batch; NaN on padding.

    The positions are found from the attention mask (never from token ids, since `pad == eos` in many tokenizers), so
    right and left padding both work.

    Args:
        values (`Sequence[Sequence[float]]`):
            One sequence per row, as long as the row's `input_ids`.
        attention_mask (`torch.Tensor` of shape `(B, T)`):
            1 on real tokens, 0 on padding.
    """
    out = torch.full(attention_mask.shape, float("nan"), dtype=torch.float32)
    real = attention_mask.bool().cpu()
    for i, row in enumerate(values):
        row = torch.as_tensor(np.asarray(row, dtype=np.float32))
        n_real = int(real[i].sum())
        if row.numel() != n_real:
            raise ValueError(
                f"Row {i} of the batch has {n_real} real tokens but {row.numel()} per-token scores. Scores must be "
                "computed on the trainer's own prepared dataset; do not change `input_ids` after scoring."
            )
        out[i, real[i]] = row
    return out


def rows_to_flat(values: Sequence[Sequence[float]], shape: torch.Size) -> torch.Tensor:
    """
    One float sequence per example, back to back in one row of shape `shape` (`(1, T)`), NaN on the padding after
    them: the layout of TRL's padding-free batches, where the collator concatenates the examples' tokens in order.
    """
    flat = [torch.as_tensor(np.asarray(row, dtype=np.float32)) for row in values]
    flat = torch.cat(flat) if flat else torch.zeros(0)
    if shape[0] != 1 or flat.numel() > shape[1]:
        raise ValueError(
            f"A padding-free batch of shape {tuple(shape)} cannot hold the {flat.numel()} per-token values of its "
            f"{len(values)} examples; scores must be computed on the trainer's own prepared dataset."
        )
    out = torch.full(tuple(shape), float("nan"), dtype=torch.float32)
    out[0, : flat.numel()] = flat
    return out


def sequence_sizes(response: torch.Tensor, position_ids: torch.Tensor) -> np.ndarray:
    """
    Response tokens per sequence of a `(B, T)` batch whose rows may hold several sequences back to back (packed or
    padding-free batches): a sequence begins at each row's first column and wherever `position_ids` restarts at 0.
    In row-major order, the order of the flat response arrays of [`select_step`].
    """
    begins = position_ids.to(response.device) == 0
    begins[:, 0] = True
    sequence = torch.cumsum(begins.flatten().long(), dim=0) - 1
    return np.bincount(
        sequence[response.flatten()].numpy(), minlength=int(sequence[-1]) + 1 if sequence.numel() else 0
    )


@dataclass
class StepSelection:
    """Outcome of one step's selection; the counts and statistics cover every process of the step."""

    keep: list[torch.Tensor]
    response_tokens: int
    kept_tokens: int
    threshold: float | None
    score_mean: float | None
    kept_score_mean: float | None
    dropped_score_mean: float | None
    rows_all_masked: int
    masked_runs: int = 0
    masked_run_max: int = 0
    # Soft weights (`token_weighting="soft"`): one float `(B, T)` tensor per micro-batch (NaN off the response
    # tokens), and their distribution over the step (`rules.soft.weight_summary`).
    weights: list[torch.Tensor] | None = None
    weight_stats: dict | None = None
    step_weights: np.ndarray | None = None  # every process's weights of the step, flat

    def record(self, step: int) -> dict:
        record = {
            "step": step,
            "response_tokens": self.response_tokens,
            "kept_tokens": self.kept_tokens,
            "kept_fraction": self.kept_tokens / self.response_tokens if self.response_tokens else None,
            "threshold": self.threshold,
            "score_mean": self.score_mean,
            "kept_score_mean": self.kept_score_mean,
            "dropped_score_mean": self.dropped_score_mean,
            "rows_all_masked": self.rows_all_masked,
            # Dropped response tokens as runs of consecutive tokens within a span: how many, and the longest.
            "masked_runs": self.masked_runs,
            "masked_run_max": self.masked_run_max,
        }
        if self.weight_stats is not None:
            record["weights"] = self.weight_stats
        return record


def select_step(
    scores: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    level: str,
    ratio: float,
    gather: GatherFn = single_process_gather,
    responses: Sequence[torch.Tensor] | None = None,
    window: int = 1,
    rule: str | Rule = DEFAULT_RULE,
    ref_losses: Sequence[torch.Tensor] | None = None,
    position_ids: Sequence[torch.Tensor | None] | None = None,
    temperature: float | None = None,
) -> StepSelection:
    """
    Choose the kept response tokens of one optimizer step.

    `"batch"`: the top `floor(ratio * N)` of the `N` response tokens of the step, over all micro-batches of all
    processes; ties go to the earlier process, micro-batch, row and position, so every process computes the same
    threshold and the count is exact. `"sample"`: the top `floor(ratio * n_i)` of each row.

    Args:
        scores (`Sequence[torch.Tensor]`):
            This process's micro-batches, each `(B, T)`, aligned with `labels`.
        labels (`Sequence[torch.Tensor]`):
            Labels of the same micro-batches; `-100` marks positions that are not trained.
        level (`str`):
            `"batch"` or `"sample"`.
        ratio (`float`):
            Fraction of response tokens kept, in `(0, 1]`.
        gather (`GatherFn`):
            Collective that returns every process's array in rank order (identity on one process).
        responses (`Sequence[torch.Tensor]`, *optional*):
            Bool `(B, T)` masks of the response tokens, the only ones ranked. Defaults to every trained position
            ([`response_mask`]); trained positions outside it are neither ranked nor marked kept.
        window (`int`, *optional*, defaults to `1`):
            `token_score_window`: each score (and, for the junk gate, each reference loss) is averaged over a centred
            window of that many response tokens of its own span ([`~selection.span_starts`]: never across rows, packed
            sequences, prompts or padding) before ranking. `1` ranks the raw scores.
        rule (`str` or `Rule`, *optional*, defaults to `"excess"`):
            `token_score_rule`, a rule of the registry (`rules/`) or a rule object: `"excess"` keeps the top scores;
            `"junk_gate"` masks, among the lower half by score, the highest reference losses
            ([`~selection.select_junk_gate`]), over the step (`"batch"`) or per row.
        ref_losses (`Sequence[torch.Tensor]`, *optional*):
            Reference losses of the same micro-batches, `(B, T)`; required by rules that read them (the junk gate).
        position_ids (`Sequence[torch.Tensor | None]`, *optional*):
            Position ids of the micro-batches (packed or padding-free batches restart them at 0 for each sequence).
            With them, each sequence is a sample: of `"sample"`, and of `rows_all_masked`.
        temperature (`float`, *optional*):
            `token_weight_temperature` with `token_weighting="soft"`: the selection also carries each response
            token's soft weight (`Rule.select_weights`, the step's ranked values). `None`: the keep mask only.

    Returns:
        [`StepSelection`] with one bool keep mask per micro-batch (True only on kept response positions).
    """
    if level not in ("batch", "sample"):
        raise ValueError(f"Per-step selection level must be 'batch' or 'sample', got {level!r}.")
    rule = _step_rule(rule, ref_losses)
    if responses is None:
        responses = [response_mask(lab.cpu()) for lab in labels]
    else:
        responses = [response.cpu() & response_mask(lab.cpu()) for response, lab in zip(responses, labels)]
    step = _flatten_step(scores, responses, ref_losses if "ref" in rule.needs else None, position_ids)
    if level == "batch":
        chosen = _select_over_step(rule, step, window, ratio, gather, temperature)
    else:
        chosen = _select_per_sample(rule, step, window, ratio, gather, temperature)
    outcome = _step_outcome(step, responses, *chosen[:4], gather)
    if temperature is not None:
        local_weights, all_weights = chosen[4:]
        outcome.weights = _per_micro_batch(responses, local_weights, torch.float32, float("nan"))
        outcome.weight_stats = weight_summary(all_weights)
        outcome.step_weights = all_weights
    return outcome


def _per_micro_batch(responses, flat: np.ndarray, dtype, fill) -> list[torch.Tensor]:
    """A flat array over this process's response tokens back into one `(B, T)` tensor per micro-batch."""
    out, cursor = [], 0
    for response in responses:
        tensor = torch.full(response.shape, fill, dtype=dtype)
        n = int(response.sum())
        tensor[response] = torch.from_numpy(np.ascontiguousarray(flat[cursor : cursor + n])).to(dtype)
        cursor += n
        out.append(tensor)
    return out


def _step_rule(rule: str | Rule, ref_losses) -> Rule:
    """The rule object of `select_step`'s `rule`, refusing a baseline and a rule whose losses are missing."""
    if not isinstance(rule, Rule):
        rule = check_score_rule(rule)
    if "ref" in rule.needs and ref_losses is None:
        raise ValueError(f"`token_score_rule={rule.name!r}` ranks by reference loss too: pass `ref_losses`.")
    return rule


@dataclass
class _StepArrays:
    """This process's response tokens of one step, flat in row-major micro-batch order: the scores, the reference
    losses (when the rule reads them), where each span begins, and the response tokens per sample."""

    scores: np.ndarray
    refs: np.ndarray | None
    starts: np.ndarray
    sample_sizes: np.ndarray

    @property
    def sample_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sample_sizes)])


def _flatten_step(scores, responses, ref_losses, position_ids) -> _StepArrays:
    """The response tokens of this process's micro-batches as flat arrays; refuses a non-finite score."""
    if position_ids is None:
        position_ids = [None] * len(responses)
    flat_scores, flat_refs, flat_starts, sample_sizes = [], [], [], []
    for i, (score, response) in enumerate(zip(scores, responses)):
        score = score.detach().float().cpu()
        bad = response & ~torch.isfinite(score)
        if bad.any():
            raise FloatingPointError(
                f"{int(bad.sum())} response tokens of this step got a non-finite score (a model produced a "
                "non-finite loss). Train and score in float32 or bfloat16 rather than float16."
            )
        flat_scores.append(score[response].numpy())
        if ref_losses is not None:
            flat_refs.append(ref_losses[i].detach().float().cpu()[response].numpy())
        ids = position_ids[i]
        mask = response.numpy()
        # Spans never cross rows, packed sequences or gaps: `span_starts` marks each one's first token.
        flat_starts.append(span_starts(mask, None if ids is None else ids.cpu().numpy())[mask])
        # Response tokens per sample: per row, or per packed sequence when one row holds several.
        sample_sizes.append(response.sum(dim=1).numpy() if ids is None else sequence_sizes(response, ids.cpu()))
    return _StepArrays(
        scores=np.concatenate(flat_scores) if flat_scores else np.zeros(0, np.float32),
        refs=(np.concatenate(flat_refs) if flat_refs else np.zeros(0, np.float32)) if ref_losses is not None else None,
        starts=np.concatenate(flat_starts) if flat_starts else np.zeros(0, bool),
        sample_sizes=np.concatenate(sample_sizes).astype(np.int64) if sample_sizes else np.zeros(0, np.int64),
    )


def _select_over_step(rule: Rule, step: _StepArrays, window: int, ratio: float, gather: GatherFn, temperature=None):
    """`"batch"`: every process's response tokens gathered in rank order and ranked together by `rule`.
    `(local keep, step keep, step scores, threshold)`, then with a `temperature` `(local weights, step weights)`."""
    # Each process windows its own tokens first: spans never cross processes, so the means are those of the whole
    # step, and only the values ranked travel.
    local = Quantities(step.sample_offsets, ref=step.refs, scores=step.scores, window=window, span_start=step.starts)
    ranked = local.windowed(step.scores)
    refs = None if step.refs is None else local.windowed(step.refs, fresh=True)  # a fresh array: windowed in place
    # Channels: the raw scores (for the statistics), then what is ranked when it differs from them, then the losses.
    windowed = ranked is not step.scores
    channels = [step.scores] + ([ranked] if windowed else []) + ([refs] if refs is not None else [])
    parts, rank = gather(np.stack(channels).astype(np.float32))
    everything = np.concatenate([part[0] for part in parts])
    quantities = Quantities(
        np.array([0, everything.size]),
        ref=np.concatenate([part[-1] for part in parts]) if refs is not None else None,
        scores=np.concatenate([part[1] for part in parts]) if windowed else everything,
    )
    if temperature is None:
        selection = rule.select(quantities, "batch", ratio)
    else:
        selection = rule.select_weights(quantities, "batch", ratio, temperature)
    start = sum(part.shape[1] for part in parts[:rank])
    local = slice(start, start + step.scores.size)
    chosen = (selection.keep[local], selection.keep, everything, selection.threshold)
    return chosen if temperature is None else (*chosen, selection.weights[local], selection.weights)


def _select_per_sample(rule: Rule, step: _StepArrays, window: int, ratio: float, gather: GatherFn, temperature=None):
    """`"sample"`: each sample of this process ranked by `rule` on its own, then the keep masks (and soft weights)
    gathered for the statistics. `(local keep, step keep, step scores, None)`, then with a `temperature`
    `(local weights, step weights)`."""
    quantities = Quantities(
        step.sample_offsets, ref=step.refs, scores=step.scores, window=window, span_start=step.starts
    )
    if temperature is None:
        selection = rule.select(quantities, "sample", ratio)
        channels = [step.scores, selection.keep.astype(np.float32)]
    else:
        selection = rule.select_weights(quantities, "sample", ratio, temperature)
        channels = [step.scores, selection.keep.astype(np.float32), selection.weights]
    parts, _ = gather(np.stack(channels).astype(np.float32))
    everything = np.concatenate([part[0] for part in parts])
    all_keep = np.concatenate([part[1] for part in parts]).astype(bool)
    chosen = (selection.keep, all_keep, everything, None)
    if temperature is None:
        return chosen
    return (*chosen, selection.weights, np.concatenate([part[2] for part in parts]))


def _step_outcome(step, responses, local_keep, all_keep, everything, threshold, gather: GatherFn) -> StepSelection:
    """The [`StepSelection`]: keep masks per micro-batch, and the statistics over every process of the step."""
    # Samples (rows, or packed sequences) whose response tokens are all dropped add no loss this step.
    offsets = step.sample_offsets
    kept_before = np.concatenate([[0], np.cumsum(local_keep, dtype=np.int64)])
    kept_per_sample = kept_before[offsets[1:]] - kept_before[offsets[:-1]]
    local_all_masked = int(((step.sample_sizes > 0) & (kept_per_sample == 0)).sum())
    keep_masks = []
    cursor = 0
    for response in responses:
        mask = torch.zeros(response.shape, dtype=torch.bool)
        n = int(response.sum())
        mask[response] = torch.from_numpy(local_keep[cursor : cursor + n].copy())
        cursor += n
        keep_masks.append(mask)
    # Runs of dropped tokens in the flat response array; a span start (row, gap or packed sequence) ends a run.
    local_runs, local_run_max = dropped_runs(~local_keep, np.flatnonzero(step.starts))
    counts = np.array([[local_all_masked, local_runs, local_run_max]], dtype=np.float32)
    count_parts, _ = gather(counts)
    kept, dropped = everything[all_keep], everything[~all_keep]
    return StepSelection(
        keep=keep_masks,
        response_tokens=int(everything.size),
        kept_tokens=int(all_keep.sum()),
        threshold=threshold,
        score_mean=float(everything.mean()) if everything.size else None,
        kept_score_mean=float(kept.mean()) if kept.size else None,
        dropped_score_mean=float(dropped.mean()) if dropped.size else None,
        rows_all_masked=int(sum(part[0, 0] for part in count_parts)),
        masked_runs=int(sum(part[0, 1] for part in count_parts)),
        masked_run_max=int(max(part[0, 2] for part in count_parts)),
    )


def apply_keep(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Labels with every response position that is not kept set to `-100` (prompt positions are already `-100`)."""
    return labels.masked_fill(~keep.to(labels.device) & (labels != -100), -100)


@dataclass
class StepRecords:
    """
    The state of per-step selection (online mode, `token_selection="batch"`): one record per optimizer step, and the
    run identity a checkpoint carries with them (a resume replays the records instead of recomputing them).
    """

    identity: dict
    records: list[dict] = field(default_factory=list)

    def checkpoint(self) -> tuple[dict, None]:
        """`(payload, arrays)` of a checkpoint: the identity and the records, no arrays."""
        return {**self.identity, "steps": self.records}, None


def select_step_tokens(
    batch_samples: list[dict],
    args,
    gather: GatherFn,
    current_losses: Callable[[dict], torch.Tensor] | None = None,
) -> StepSelection:
    """
    Choose the kept tokens of one optimizer step and set the others' labels to `-100` in `batch_samples`, in place.

    Each micro-batch carries its static values in a column the collator filled (`token_scores` with
    `token_selection="batch"`, `token_ref_losses` in online mode, where `current_losses(batch)` gives the trained
    model's losses and the ranking is Rho-1's excess loss `L_current - L_ref`). Trained tokens that are not response
    tokens stay trained. A batch that carries `dropped_labels` (a dropped-token loss is configured) gets the labels
    this step drops added to it. With `token_weighting="soft"` no label changes: each batch gets the step's soft
    weights as `token_weights` instead (`(B, T)`, NaN off the response tokens), for the weighted loss.
    """
    online = current_losses is not None
    column = TOKEN_REF_LOSSES_COLUMN if online else TOKEN_SCORES_COLUMN
    scores, responses, trained, ref_losses = [], [], [], []
    for batch in batch_samples:
        if column not in batch:
            raise ValueError(
                f"A training batch has no `{column}` tensor: the train dataset was replaced or its columns removed "
                "after scoring. Let the trainer prepare the dataset it trains on."
            )
        values = batch.pop(column).float()
        # The stored column is NaN wherever a position is not a response token (see `positions.py`).
        trained.append(response_mask(batch["labels"].cpu()))
        responses.append(trained[-1] & ~torch.isnan(values.cpu()))
        if online:
            ref_losses.append(values)
            # Rho-1's excess loss: the model being trained (this step's weights) minus the fixed reference.
            values = excess_loss(current_losses(batch).to(values.device), values)
        scores.append(values)
    selection = select_step(
        scores,
        [batch["labels"] for batch in batch_samples],
        level="batch" if args.token_selection == "batch" else "sample",
        ratio=args.token_keep_ratio,
        gather=gather,
        responses=responses,
        # Span-aware ranking: the window stays inside each row's (or packed sequence's) response spans.
        window=args.token_score_window,
        rule=args.token_score_rule,
        ref_losses=ref_losses if online else None,
        position_ids=[batch.get("position_ids") for batch in batch_samples],
        temperature=args.token_weight_temperature if getattr(args, "token_weighting", "mask") == "soft" else None,
    )
    if selection.weights is not None:
        for batch, weights in zip(batch_samples, selection.weights):
            batch[TOKEN_WEIGHTS_COLUMN] = weights.to(batch["labels"].device)
        return selection
    for batch, keep, response, trained_here in zip(batch_samples, selection.keep, responses, trained):
        labels = batch["labels"]
        batch["labels"] = apply_keep(labels, keep | (trained_here & ~response))
        if DROPPED_LABELS_KEY in batch:
            dropped = (batch["labels"] == -100) & (labels != -100)
            batch[DROPPED_LABELS_KEY] = torch.where(dropped, labels, batch[DROPPED_LABELS_KEY].to(labels.device))
    return selection


def accelerator_gather(accelerator) -> GatherFn:
    """A [`GatherFn`] over accelerate's processes: every process's `(channels, n)` array, in rank order."""
    if accelerator.num_processes == 1:
        return single_process_gather

    def gather(local: np.ndarray) -> tuple[list[np.ndarray], int]:
        # Sizes differ from process to process: pad, gather, then cut.
        device = accelerator.device
        tensor = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32)).to(device)
        sizes = accelerator.gather(torch.tensor([tensor.shape[1]], device=device)).cpu().tolist()
        padded = accelerator.pad_across_processes(tensor, dim=1)
        gathered = accelerator.gather(padded[None]).cpu().numpy()
        return [gathered[rank, :, : sizes[rank]] for rank in range(len(sizes))], accelerator.process_index

    return gather


__all__ = [
    "StepRecords",
    "StepSelection",
    "accelerator_gather",
    "apply_keep",
    "response_mask",
    "rows_to_flat",
    "rows_to_padded",
    "select_step",
    "select_step_tokens",
    "sequence_sizes",
    "single_process_gather",
]
