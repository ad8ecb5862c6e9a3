"""Per-token cross-entropy of a model on a prepared dataset, aligned to label positions.

`token_losses[j]` is `-log p(x_j | x_<j)`: the loss of predicting the token at label position `j`. Position 0 has no
prediction and prompt tokens are not trained, so both are NaN.

[`token_losses`] is the package's one per-token loss function: scoring, evaluation, purge-mix perplexity and the
benchmarks all call it. It runs the model's own forward (so FSDP2 and ZeRO-3 hooks gather the shards as in training),
and replaces only the LM head for the call: the hidden states of the scored positions alone are projected, in float32
chunks, so no `(batch, seq, vocab)` logits ever exist and score differences are not drowned by bf16 rounding. A bf16
head is cast to float32 one block of vocabulary rows at a time, never whole (2 GB at 128k x 4096).
"""

import contextlib
import dataclasses
import math
import random
import types
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from transformers.utils import ModelOutput

from .utils import is_peft_model

# Elements of one float32 logits chunk (rows x vocabulary block): 64M = 256 MB, whatever the vocabulary.
_HEAD_CHUNK_ELEMENTS = 1 << 26
# Elements of one float32 block of a bf16/fp16 head's rows: 16M = 64 MB (4096 rows of a 4096-wide head), so the whole
# head (128k x 4096: 2 GB in float32) is never copied at once.
_HEAD_BLOCK_ELEMENTS = 1 << 24


@dataclasses.dataclass
class TokenLossOutput(ModelOutput):
    """What a model returns inside [`scoring_head`]: the per-token losses, `(B, T)` float32, NaN where not scored."""

    token_losses: torch.Tensor | None = None


@dataclasses.dataclass
class ScoringStats:
    """Counters of the scoring forwards of one process: tests and logs check them (every rank must run as many)."""

    forwards: int = 0
    # The dtype the matmuls of the last forward of each role ran in (the autocast dtype, or the activations' dtype).
    compute_dtypes: dict[str, str] = dataclasses.field(default_factory=dict)


def scored_positions(
    labels: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """
    `(B, T)` bool: label position `j` is scored when its label is not `-100` and both it and the token before it are
    real tokens (attention mask 1). Position 0 never is; the first real token of a left-padded row is predicted from
    padding and is not either. Padding is found by the attention mask, never by token id (`pad == eos` in many
    tokenizers).

    Packed and padding-free rows come without an attention mask and with `position_ids` that restart at 0 for each
    sequence (padding is labelled `-100`): there a position is scored when its label is not `-100` and its position id
    is not 0, since the first token of a sequence is not predicted from its own sequence.
    """
    scored = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    if attention_mask is None:
        scored[:, 1:] = labels[:, 1:] != -100
    else:
        mask = attention_mask.bool()
        scored[:, 1:] = mask[:, 1:] & mask[:, :-1] & (labels[:, 1:] != -100)
    if position_ids is not None:
        scored &= position_ids.to(scored.device) != 0
    return scored


def align_token_losses(log_probs: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """
    Move shifted log-probabilities (`log_probs[b, i] = log p(x_{i+1} | x_<=i)`, shape `(B, T - 1)`, e.g. from TRL's
    fused head) to label positions `(B, T)`, NaN where not scored (see [`scored_positions`]).
    """
    batch, length = labels.shape
    if log_probs.shape != (batch, length - 1):
        raise ValueError(f"Expected log-probs of shape {(batch, length - 1)}, got {tuple(log_probs.shape)}.")
    losses = torch.full((batch, length), float("nan"), dtype=torch.float32, device=log_probs.device)
    losses[:, 1:] = -log_probs.float()
    return losses.masked_fill(~scored_positions(labels, attention_mask), float("nan"))


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM module whose `forward` computes the head (the base model of a PEFT model, the module of an
    accelerate/DeepSpeed/DDP wrapper, the original module of a `torch.compile` wrapper)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            break
    return model.get_base_model() if is_peft_model(model) else model


def without_compile(model: torch.nn.Module) -> torch.nn.Module:
    """
    The module under the `torch.compile` wrappers around `model` (`torch_compile=True`: accelerate compiles the model
    last, around DDP or FSDP2). Scoring calls it so that dynamo does not trace and recompile the swapped forward for
    every batch shape: the forward still runs through the DDP/FSDP2 root and its hooks, only uncompiled.
    """
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    return model


def _compute_dtype(device_type: str, activations: torch.dtype) -> str:
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else activations
    return str(dtype).replace("torch.", "")


def _logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """The scaling and soft-capping some architectures apply to their logits (none for Llama, Qwen, Mistral)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    if scale is None and getattr(text, "logits_scaling", None):
        scale = 1.0 / text.logits_scaling
    cap = getattr(text, "final_logit_softcapping", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None and scale != 1.0:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def _head_losses(causal_lm, hidden: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Losses at the scored positions, projecting only their hidden states through the LM head in float32 chunks."""
    from torch.distributed.tensor import DTensor
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    predict = scored[:, 1:]  # hidden state i predicts token i + 1
    states = hidden[:, :-1][predict]
    targets = labels[:, 1:][predict]
    head = causal_lm.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if isinstance(weight, DTensor):  # FSDP2 outside the root's unsharded window
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    transform = _logit_transform(causal_lm.config)
    with maybe_gather_lm_head_ctx(weight, bias), torch.autocast(states.device.type, enabled=False):
        losses = _chunked_cross_entropy(states, targets.to(weight.device), weight, bias, transform)
    out = torch.full(labels.shape, float("nan"), dtype=torch.float32, device=states.device)
    out[scored] = losses.to(out.device)
    return out


def _chunked_cross_entropy(
    states: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """
    `logsumexp(logits) - logits[target]` per row, in float32, without a float32 copy of the whole head: the weight is
    cast one block of vocabulary rows at a time (each block once per call) and the logsumexp runs over the blocks. A
    float32 head is used as it is (`.float()` returns the same tensor), in one block.
    """
    vocab, width = weight.shape
    rows = weight.shape[0] if weight.dtype == torch.float32 else max(1, _HEAD_BLOCK_ELEMENTS // width)
    block_rows = min(vocab, rows)
    chunk = max(1, _HEAD_CHUNK_ELEMENTS // block_rows)
    count = states.shape[0]
    lse = torch.full((count,), float("-inf"), dtype=torch.float32, device=weight.device)
    picked = torch.zeros(count, dtype=torch.float32, device=weight.device)
    for first in range(0, vocab, block_rows):
        block = weight[first : first + block_rows].float()
        block_bias = bias[first : first + block_rows].float() if bias is not None else None
        for start in range(0, count, chunk):
            part = states[start : start + chunk].float().to(weight.device)
            logits = transform(torch.nn.functional.linear(part, block, block_bias))
            span = slice(start, start + chunk)
            if block_rows == vocab:  # one block: the plain logsumexp, bit for bit as without blocks
                lse[span] = torch.logsumexp(logits, dim=-1)
            else:
                lse[span] = torch.logaddexp(lse[span], torch.logsumexp(logits, dim=-1))
            local = targets[span] - first
            inside = (local >= 0) & (local < block.shape[0])
            hit = logits.gather(1, local.clamp(0, block.shape[0] - 1)[:, None]).squeeze(1)
            picked[span] = torch.where(inside, hit, picked[span])
        del block, block_bias
    return lse - picked


@contextlib.contextmanager
def scoring_head(model: torch.nn.Module, stats: ScoringStats | None = None, role: str = "") -> Iterator[None]:
    """
    For the duration, calling `model(input_ids=..., attention_mask=..., labels=...)` (the model as prepared: a PEFT
    model, a DeepSpeed engine, an FSDP2 module) returns a [`TokenLossOutput`] instead of logits. Packed rows are called
    with `attention_mask=None` and per-sequence `position_ids`, as TRL's padding-free batches are trained: transformers
    then confines attention to each sequence (`masking_utils.find_packed_sequence_indices` for eager and SDPA, the
    varlen path of flash attention), and only positions of the same sequence are scored (see [`scored_positions`]).

    Only the causal LM's own `forward` is swapped (an instance attribute, restored on exit): wrappers, PEFT adapters
    and the sharding hooks of FSDP2/ZeRO-3 all run as in training, and the backbone is called as a submodule so its
    parameters are gathered by the same hooks.
    """
    inner = unwrap_causal_lm(model)
    had_instance_forward = "forward" in vars(inner)
    saved_forward = vars(inner).get("forward")

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        for name in ("fused_lm_head", "num_items_in_batch", "use_cache", "logits_to_keep", "return_dict"):
            kwargs.pop(name, None)
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        outputs = self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        hidden = outputs.last_hidden_state
        if stats is not None:
            stats.forwards += 1
            stats.compute_dtypes[role] = _compute_dtype(hidden.device.type, hidden.dtype)
        scored = scored_positions(labels, attention_mask, kwargs.get("position_ids"))
        return TokenLossOutput(token_losses=_head_losses(self, hidden, labels, scored))

    inner.forward = types.MethodType(forward, inner)
    try:
        yield
    finally:
        if had_instance_forward:
            inner.forward = saved_forward
        else:
            del inner.forward


def scoring_mixed_precision(accelerator) -> str:
    """
    The autocast scoring forwards run in: the run's mixed precision, except under DeepSpeed, whose engine trains in
    its own precision (weights cast to the config's bf16/fp16, no autocast), so its scoring forwards do the same.
    """
    if getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None) is not None:
        return "no"
    return accelerator.mixed_precision or "no"


def precision_context(
    device_type: str, mixed_precision: str | None
) -> Callable[[], contextlib.AbstractContextManager]:
    """
    The one precision every scoring forward of a run runs in: autocast to the run's mixed precision (`"bf16"`,
    `"fp16"`), or autocast off (`"no"`), whatever the wrappers around the model do. The base pass and the reference
    pass of a score can then never differ in dtype. The LM head always projects in float32 (see [`scoring_head`]).
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "no")
    if dtype is None:
        return lambda: torch.autocast(device_type, enabled=False)
    return lambda: torch.autocast(device_type, dtype=dtype)


@torch.no_grad()
def token_losses(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    stats: ScoringStats | None = None,
    role: str = "",
    **model_kwargs,
) -> torch.Tensor:
    """
    Per-token losses `(B, T)` float32 of one batch at label positions, NaN where not scored (see
    [`scored_positions`]). The package's one per-token loss function.

    Args:
        model (`torch.nn.Module`):
            The causal LM as it runs: plain, PEFT, or wrapped/sharded by accelerate. Dropout and adapters are the
            caller's business ([`eval_mode`], `use_adapter`).
        input_ids, attention_mask, labels (`torch.Tensor` of shape `(B, T)`):
            One batch on the model's input device; labels `-100` where a position is not scored. `attention_mask` is
            `None` for packed or padding-free rows, which pass `position_ids` (restarting at 0 per sequence) instead.
        precision (`Callable`, *optional*):
            Factory of the precision context (see [`precision_context`]).
        stats (`ScoringStats`, *optional*):
            Counts the forward and records the hidden states' dtype under `role`.
        model_kwargs:
            Passed to the backbone (e.g. `position_ids` for left-padded or packed rows).
    """
    model = without_compile(model)
    with scoring_head(model, stats, role), precision():
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **model_kwargs)
    return outputs.token_losses.float()


@contextlib.contextmanager
def preserve_rng_state() -> Iterator[None]:
    """Restore Python, numpy and torch (CPU and CUDA) random states on exit, so scoring never shifts training."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off for the duration (eval mode), then the previous mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def packed_position_ids(seq_lengths: Sequence[int]) -> torch.Tensor:
    """Position ids of one packed row: `0, 1, ...` restarting at every sequence (`seq_lengths` from TRL's packing)."""
    return torch.cat([torch.zeros(0, dtype=torch.long), *(torch.arange(int(n)) for n in seq_lengths)])


def collate_right_padded(
    rows: Sequence[dict], pad_token_id: int, flatten_packed: bool = True
) -> dict[str, torch.Tensor]:
    """
    Right-padded `input_ids`, `labels` (the ids where a row has no labels) and `attention_mask` of prepared rows.

    Packed rows (a `seq_lengths` column, from TRL's `"bfd"` packing) come with `position_ids` that restart at 0 for
    every sequence and no attention mask, as TRL trains them (padding-free): the model then attends only within each
    sequence (see [`scoring_head`]). With `flatten_packed` (for flash attention, which reads packed `position_ids` only
    in a batch of one row) the rows go back to back in one row of shape `(1, total)`, as TRL's padding-free collator
    lays them out; otherwise (eager and SDPA, which find the sequences of every row) one row each, right-padded, with
    position 0 and label `-100` on padding.
    """
    packed = "seq_lengths" in rows[0]
    positions = []
    for row in rows if packed else ():
        positions.append(packed_position_ids(row["seq_lengths"]))
        if positions[-1].numel() != len(row["input_ids"]):
            raise ValueError(
                f"A packed row has {len(row['input_ids'])} tokens but its `seq_lengths` sum to "
                f"{positions[-1].numel()}; the prepared dataset was changed after packing."
            )
    if packed and flatten_packed:
        labels = [row["labels"] if "labels" in row else row["input_ids"] for row in rows]
        return {
            "input_ids": torch.as_tensor([token for row in rows for token in row["input_ids"]], dtype=torch.long)[
                None
            ],
            "labels": torch.as_tensor([label for row in labels for label in row], dtype=torch.long)[None],
            "position_ids": torch.cat(positions)[None],
        }
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"])
        labels[i, :n] = torch.as_tensor(row["labels"] if "labels" in row else row["input_ids"])
        attention_mask[i, :n] = 1
    if packed:
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row_positions in enumerate(positions):
            position_ids[i, : row_positions.numel()] = row_positions
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def flattens_packed_rows(model: torch.nn.Module) -> bool:
    """
    Whether packed rows are scored back to back in one row: for every attention implementation but eager and SDPA,
    which find the sequences of each row of a batch from its `position_ids` (transformers' `masking_utils`) and so
    need no `(total x total)` attention over the flattened batch. Flash attention honours packed `position_ids` only
    in a batch of one row.
    """
    config = getattr(unwrap_causal_lm(model), "config", None)
    return getattr(config, "_attn_implementation", None) not in ("eager", "sdpa")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its first parameter's device (CPU for a model with no parameters here)."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def forwards_needed(rows: int, world: int, batch_size: int) -> int:
    """Forwards each process runs to score `rows` rows dealt round-robin over `world` processes: the same on all."""
    return math.ceil(math.ceil(rows / world) / batch_size) if rows else 0


def deal_rows(rows: Sequence[int], lengths: Sequence[int], world: int, rank: int) -> list[int]:
    """
    This process's share of `rows`: sorted longest first, then dealt round-robin, so every process gets rows of
    similar lengths (no shard waits on one rank's long tail) and at most one row more than any other.
    """
    order = sorted(range(len(rows)), key=lambda i: (-int(lengths[i]), i))
    return [rows[i] for i in order[rank::world]]


@torch.no_grad()
def compute_token_losses(
    model: torch.nn.Module,
    dataset,
    row_indices: Sequence[int],
    batch_size: int,
    pad_token_id: int,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress=None,
    num_forwards: int | None = None,
    filler_row: int | None = None,
    precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    stats: ScoringStats | None = None,
    role: str = "",
    device: torch.device | None = None,
) -> list[np.ndarray]:
    """
    Per-token losses of `model` on the rows `row_indices` of a prepared dataset (`input_ids` and `labels` columns).

    Rows are batched longest-first to waste little on padding; the result is in the order of `row_indices`, one
    float32 array per row with the row's length, NaN where not scored.

    Args:
        model (`torch.nn.Module`):
            Causal LM (or PEFT model, or the model as accelerate prepared it). Put into eval mode for the call.
        dataset (`datasets.Dataset`):
            Prepared dataset with `input_ids` and `labels` (and `seq_lengths` when packed: each packed row is scored
            with its sequences kept apart, see [`collate_right_padded`]).
        row_indices (`Sequence[int]`):
            Rows to score.
        batch_size (`int`):
            Rows per forward.
        pad_token_id (`int`):
            Id written into padding positions (masked by the attention mask, so its value never matters).
        forward_context (`Callable`, *optional*):
            Factory of a context entered around the scoring, e.g. to disable or select PEFT adapters.
        progress (`tqdm`, *optional*):
            Progress bar advanced by the number of rows scored.
        num_forwards (`int`, *optional*):
            Run exactly this many forwards: when the rows need fewer, the rest score `filler_row` and drop the result.
            Under FSDP2 and ZeRO-3 every forward is a collective, so every process must run as many.
        filler_row (`int`, *optional*):
            Row used by those extra forwards.
        precision, stats, role:
            See [`token_losses`].
        device (`torch.device`, *optional*):
            Where the inputs go (defaults to the model's first parameter's device).
    """
    row_indices = list(row_indices)
    needed = math.ceil(len(row_indices) / batch_size)
    num_forwards = needed if num_forwards is None else num_forwards
    if num_forwards < needed:
        raise ValueError(
            f"{len(row_indices)} rows need {needed} forwards at batch size {batch_size}, not {num_forwards}."
        )
    if num_forwards > needed and filler_row is None:
        raise ValueError("Extra forwards need a `filler_row` to score.")
    columns = [c for c in ("input_ids", "labels", "seq_lengths") if c in dataset.column_names]
    flatten = "seq_lengths" in columns and flattens_packed_rows(model)
    subset = dataset.select(row_indices).select_columns(columns) if row_indices else None
    lengths = np.array([len(ids) for ids in subset["input_ids"]]) if row_indices else np.zeros(0, dtype=int)
    order = np.argsort(-lengths, kind="stable")
    results: list[np.ndarray | None] = [None] * len(row_indices)
    device = device or model_device(model)
    filler = None
    with preserve_rng_state(), eval_mode(model), forward_context():
        for index in range(num_forwards):
            positions = order[index * batch_size : (index + 1) * batch_size]
            if len(positions):
                rows = list(subset.select(positions.tolist()))
            else:
                if filler is None:
                    filler = list(dataset.select([filler_row]).select_columns(columns))
                rows = filler
            batch = collate_right_padded(rows, pad_token_id, flatten_packed=flatten)
            batch = {key: value.to(device) for key, value in batch.items()}
            losses = token_losses(
                model,
                batch.pop("input_ids"),
                batch.pop("attention_mask", None),
                batch.pop("labels"),
                precision=precision,
                stats=stats,
                role=role,
                **batch,
            )
            losses = losses.cpu().numpy()
            # Flattened packed rows come back back to back in one row (see `collate_right_padded`); others one each.
            starts = np.cumsum([0, *lengths[positions]]) if flatten else None
            for i, position in enumerate(positions):
                if flatten:
                    results[position] = losses[0, starts[i] : starts[i + 1]].copy()
                else:
                    results[position] = losses[i, : lengths[position]].copy()
            if progress is not None and len(positions):
                progress.update(len(positions))
    return results
