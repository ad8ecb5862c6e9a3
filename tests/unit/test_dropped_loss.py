"""The dropped-token loss hook: the collator and the per-step selection hand the loss the dropped positions, the
trainer adds the hook's term, and without a hook nothing of it exists."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.collator import RowStore, TokenCleaningCollator
from token_clean_trainer.columns import DROPPED_LABELS_KEY, ROW_COLUMN
from token_clean_trainer.step_selection import select_step_tokens, single_process_gather

PAD = 2
EXAMPLES = [
    {"input_ids": [1, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2], ROW_COLUMN: 0},
    {"input_ids": [1, 8, 2], "labels": [-100, 8, 2], ROW_COLUMN: 1},
]
KEEP = [[0, 0, 1, 0, 1], [0, 0, 1]]  # row 0 drops its label 7 (position 3), row 1 its label 8 (position 1)


def collator(dropped: bool, padding_free: bool = False) -> TokenCleaningCollator:
    store = RowStore()
    store.set_keep(np.array([0, 5, 8]), np.concatenate(KEEP).astype(bool))
    base = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=padding_free)
    return TokenCleaningCollator(base, store=store, dropped_labels=dropped)


def test_no_dropped_key_without_a_hook():
    batch = collator(dropped=False)([dict(e) for e in EXAMPLES])
    assert DROPPED_LABELS_KEY not in batch
    assert batch["labels"].tolist() == [[-100, -100, 6, -100, 2], [-100, -100, 2, -100, -100]]


def test_collator_hands_over_exactly_the_dropped_positions():
    batch = collator(dropped=True)([dict(e) for e in EXAMPLES])
    assert batch["labels"].tolist() == [[-100, -100, 6, -100, 2], [-100, -100, 2, -100, -100]]
    assert batch[DROPPED_LABELS_KEY].dtype == torch.long
    assert batch[DROPPED_LABELS_KEY].tolist() == [[-100, -100, -100, 7, -100], [-100, 8, -100, -100, -100]]


def test_padding_free_dropped_positions_are_flattened_like_the_labels():
    batch = collator(dropped=True, padding_free=True)([dict(e) for e in EXAMPLES])
    assert batch["labels"].tolist() == [[-100, -100, 6, -100, 2, -100, -100, 2]]
    assert batch[DROPPED_LABELS_KEY].tolist() == [[-100, -100, -100, 7, -100, -100, 8, -100]]


def test_eval_rows_carry_no_dropped_key():
    batch = collator(dropped=True)([{k: v for k, v in e.items() if k != ROW_COLUMN} for e in EXAMPLES])
    assert DROPPED_LABELS_KEY not in batch


def step_batch(with_dropped: bool) -> dict:
    batch = {
        "input_ids": torch.tensor([[1, 5, 6, 7, 8]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
        "labels": torch.tensor([[-100, 5, 6, 7, 8]]),
        "token_scores": torch.tensor([[float("nan"), 4.0, 3.0, 2.0, 1.0]]),
    }
    if with_dropped:
        batch[DROPPED_LABELS_KEY] = torch.full((1, 5), -100)
    return batch


STEP_ARGS = SimpleNamespace(
    token_selection="batch", token_keep_ratio=0.5, token_score_window=1, token_score_rule="excess"
)


def test_per_step_selection_adds_the_tokens_it_drops():
    batch = step_batch(with_dropped=True)
    select_step_tokens([batch], STEP_ARGS, gather=single_process_gather)
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, -100]]
    assert batch[DROPPED_LABELS_KEY].tolist() == [[-100, -100, -100, 7, 8]]
    plain = step_batch(with_dropped=False)
    select_step_tokens([plain], STEP_ARGS, gather=single_process_gather)
    assert DROPPED_LABELS_KEY not in plain and torch.equal(plain["labels"], batch["labels"])


class ToyLoss:
    """Half the mean log-probability of the kept tokens the forward returned, recording what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, outputs, inputs, dropped):
        term = 0.5 * outputs.log_probs.sum() / dropped.num_items_in_batch
        self.calls.append((dropped.labels.clone(), dropped.mask.clone(), DROPPED_LABELS_KEY in inputs, term.detach()))
        return term


def build(output_dir, model_dir, ref_dir, tokenizer, **overrides):
    return TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(output_dir, ref_model_name_or_path=ref_dir, max_steps=2, **overrides),
        train_dataset=Dataset.from_list(arithmetic_rows(8)),
        processing_class=tokenizer,
    )


@pytest.fixture
def trainer(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    return build(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_loss_changes_by_the_hook_term_and_the_key_never_reaches_the_model(
    loss_type, tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer
):
    trainer = build(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, loss_type=loss_type)
    labels = torch.tensor([[-100, -100, 30, 31, 32, 33], [-100, 40, 41, 42, -100, -100]])
    dropped = torch.tensor([[-100, -100, -100, 31, -100, -100], [-100, -100, 41, -100, -100, -100]])
    inputs = {
        "input_ids": torch.tensor([[1, 20, 30, 31, 32, 33], [1, 40, 41, 42, 2, 2]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
        "labels": labels.masked_fill(dropped != -100, -100),
    }
    trainer.model.eval()  # no dropout: the two forwards below are the same computation
    plain = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=torch.tensor(5))
    sft = SFTTrainer.compute_loss(trainer, trainer.model, dict(inputs), num_items_in_batch=torch.tensor(5))
    assert torch.equal(plain, sft)  # no hook: SFTTrainer's loss, bit for bit
    # A key left in the batch without a hook is dropped too, and the loss is SFTTrainer's.
    untouched = trainer.compute_loss(
        trainer.model, {**inputs, DROPPED_LABELS_KEY: dropped}, num_items_in_batch=torch.tensor(5)
    )
    assert torch.equal(plain, untouched)
    toy = ToyLoss()
    trainer.set_dropped_token_loss(toy)
    total = trainer.compute_loss(
        trainer.model, {**inputs, DROPPED_LABELS_KEY: dropped}, num_items_in_batch=torch.tensor(5)
    )
    ((given, mask, key_in_inputs, term),) = toy.calls
    assert torch.equal(given, dropped) and mask.tolist() == (dropped != -100).tolist() and not key_in_inputs
    assert torch.equal(total, plain + term)


def test_hook_sees_every_dropped_token_of_a_fixed_run(trainer):
    toy = ToyLoss()
    trainer.set_dropped_token_loss(toy)
    trainer.train()  # 2 steps of 4 rows: one epoch of the 8 rows
    report = trainer.token_cleaning_state.report
    assert sum(int(mask.sum()) for _, mask, _, _ in toy.calls) == report["response_tokens"] - report["kept_tokens"]
    trainer.set_dropped_token_loss(None)
    assert trainer.data_collator.dropped_labels is False


def test_no_hook_without_token_cleaning(tmp_path, tiny_model_dir, tokenizer):
    plain = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(tmp_path, token_cleaning="none"),
        train_dataset=Dataset.from_list(arithmetic_rows(8)),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match="needs token cleaning on"):
        plain.set_dropped_token_loss(ToyLoss())
