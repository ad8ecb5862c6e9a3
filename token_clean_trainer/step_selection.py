"""Selection within one optimizer step: the `"batch"` level of fixed mode and the online (Rho-1 style) mode.

An optimizer step is made of the micro-batches of every process (gradient accumulation x data parallelism). The
trainer collects all of them before the first forward of the step (`Trainer.get_batch_samples`), so the kept tokens
can be ranked across the whole step and their labels set to `-100` before `num_items_in_batch` is counted: the loss is
then the mean over the kept tokens of the step, exactly as if those labels had been masked in the data.

Scores are `(B, T)` float tensors aligned with `labels` (label position `j` holds the score of predicting token `j`),
NaN where a position is not a response token. Pure torch/numpy, no model and no global random state.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .selection import keep_count, select_global

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

    def record(self, step: int) -> dict:
        return {
            "step": step,
            "response_tokens": self.response_tokens,
            "kept_tokens": self.kept_tokens,
            "kept_fraction": self.kept_tokens / self.response_tokens if self.response_tokens else None,
            "threshold": self.threshold,
            "score_mean": self.score_mean,
            "kept_score_mean": self.kept_score_mean,
            "dropped_score_mean": self.dropped_score_mean,
            "rows_all_masked": self.rows_all_masked,
        }


def select_step(
    scores: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    level: str,
    ratio: float,
    gather: GatherFn = single_process_gather,
    responses: Sequence[torch.Tensor] | None = None,
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

    Returns:
        [`StepSelection`] with one bool keep mask per micro-batch (True only on kept response positions).
    """
    if level not in ("batch", "sample"):
        raise ValueError(f"Per-step selection level must be 'batch' or 'sample', got {level!r}.")
    if responses is None:
        responses = [response_mask(lab.cpu()) for lab in labels]
    else:
        responses = [response.cpu() & response_mask(lab.cpu()) for response, lab in zip(responses, labels)]
    flat_scores, row_sizes = [], []
    for score, response in zip(scores, responses):
        score = score.detach().float().cpu()
        bad = response & ~torch.isfinite(score)
        if bad.any():
            raise FloatingPointError(
                f"{int(bad.sum())} response tokens of this step got a non-finite score (a model produced a "
                "non-finite loss). Train and score in float32 or bfloat16 rather than float16."
            )
        flat_scores.append(score[response].numpy())
        row_sizes.append(response.sum(dim=1).numpy())
    local_scores = np.concatenate(flat_scores) if flat_scores else np.zeros(0, np.float32)
    local_rows = np.concatenate(row_sizes).astype(np.int64) if row_sizes else np.zeros(0, np.int64)

    if level == "batch":
        parts, rank = gather(local_scores[None, :].astype(np.float32))
        everything = np.concatenate([part[0] for part in parts])
        start = sum(part.shape[1] for part in parts[:rank])
        selection = select_global(everything, ratio)
        local_keep = selection.keep[start : start + local_scores.size]
        threshold = selection.threshold
        all_keep = selection.keep
    else:
        local_keep = np.zeros(local_scores.size, dtype=bool)
        row_offsets = np.concatenate([[0], np.cumsum(local_rows)])
        for begin, end in zip(row_offsets[:-1], row_offsets[1:]):
            n_keep = keep_count(ratio, int(end - begin))
            if n_keep:
                order = np.argsort(-local_scores[begin:end], kind="stable")[:n_keep]
                local_keep[begin + order] = True
        parts, _ = gather(np.stack([local_scores, local_keep.astype(np.float32)]).astype(np.float32))
        everything = np.concatenate([part[0] for part in parts])
        all_keep = np.concatenate([part[1] for part in parts]).astype(bool)
        threshold = None

    # Rows whose response tokens are all dropped add no loss this step; counted over every process.
    local_all_masked = 0
    keep_masks = []
    cursor = 0
    for response in responses:
        mask = torch.zeros(response.shape, dtype=torch.bool)
        n = int(response.sum())
        mask[response] = torch.from_numpy(local_keep[cursor : cursor + n].copy())
        cursor += n
        kept_per_row = mask.sum(dim=1)
        local_all_masked += int(((response.sum(dim=1) > 0) & (kept_per_row == 0)).sum())
        keep_masks.append(mask)
    all_masked = int(sum(part[0, 0] for part in gather(np.array([[local_all_masked]], dtype=np.float32))[0]))

    kept, dropped = everything[all_keep], everything[~all_keep]
    return StepSelection(
        keep=keep_masks,
        response_tokens=int(everything.size),
        kept_tokens=int(all_keep.sum()),
        threshold=threshold,
        score_mean=float(everything.mean()) if everything.size else None,
        kept_score_mean=float(kept.mean()) if kept.size else None,
        dropped_score_mean=float(dropped.mean()) if dropped.size else None,
        rows_all_masked=all_masked,
    )


def apply_keep(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Labels with every response position that is not kept set to `-100` (prompt positions are already `-100`)."""
    return labels.masked_fill(~keep.to(labels.device) & (labels != -100), -100)


__all__ = [
    "StepSelection",
    "apply_keep",
    "response_mask",
    "rows_to_padded",
    "select_step",
    "single_process_gather",
]
