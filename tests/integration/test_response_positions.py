"""Only response tokens are ranked, in every format; trained non-response tokens are never dropped."""

import numpy as np
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tests.conftest import cpu_args
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.positions import RESPONSE_MASK_COLUMN, assistant_token_mask


def conversations(n=8):
    rows = []
    for i in range(n):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You answer sums."},
                    {"role": "user", "content": f"What is {i} plus {i + 3}?"},
                    {"role": "assistant", "content": f"It is {2 * i + 3}."},
                    {"role": "user", "content": "Thanks! And doubled?"},
                    {"role": "assistant", "content": f"Doubled, it is {4 * i + 6}."},
                ]
            }
        )
    return Dataset.from_list(rows)


def build(tmp_path, model_dir, ref_dir, tokenizer, dataset, **overrides):
    return TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(tmp_path, ref_model_name_or_path=ref_dir, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def flat(column):
    return np.concatenate([np.asarray(row) for row in column])


def test_conversation_trained_whole_ranks_only_assistant_tokens(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    dataset = conversations()
    trainer = build(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, dataset)
    prepared = trainer.train_dataset
    # TRL trains every token (assistant_only_loss=False): labels == input_ids.
    assert prepared[0]["labels"] == prepared[0]["input_ids"]
    assistant = flat([assistant_token_mask(tokenizer, row)[1] for row in dataset["messages"]]).astype(bool)
    assert flat(prepared[RESPONSE_MASK_COLUMN]).astype(bool).tolist() == assistant.tolist()

    scored = trainer.score_tokens()
    scores, keep = flat(scored["token_scores"]).astype(np.float32), flat(scored["token_keep"]).astype(bool)
    first = np.zeros(len(scores), dtype=bool)
    first[np.concatenate([[0], np.cumsum([len(r) for r in prepared["input_ids"]])[:-1]])] = True
    response = assistant & ~first
    # No system, user or template position is ever ranked (no score) or masked (always kept).
    assert np.isnan(scores[~response]).all() and np.isfinite(scores[response]).all()
    assert keep[~response & ~first].all()
    report = trainer.token_cleaning_state.report
    assert report["response_tokens"] == int(response.sum())
    assert report["kept_tokens"] == int(0.6 * response.sum()) == int((keep & response).sum())
    assert report["trained_non_response_tokens"] == int((~response & ~first).sum()) > 0

    # What the model trains on: every non-response label untouched, dropped tokens only among the assistant's.
    batch = next(iter(trainer.get_train_dataloader()))
    labels, ids = batch["labels"], batch["input_ids"]
    rows = len(labels)
    for i in range(rows):
        n = len(prepared[i]["input_ids"])
        row_response = response[first.nonzero()[0][i] : first.nonzero()[0][i] + n]
        dropped = (labels[i, :n] == -100).numpy()
        assert not (dropped & ~row_response)[1:].any()
        assert (labels[i, :n][~dropped] == ids[i, :n][~dropped]).all()


def test_per_step_selection_ranks_only_assistant_tokens(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    trainer = build(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, conversations(), token_selection="batch")
    seen = []
    original = trainer.get_batch_samples

    def recording(epoch_iterator, num_batches, device):
        batches, count = original(epoch_iterator, num_batches, device)
        seen.extend((b["input_ids"].clone(), b["labels"].clone(), b["attention_mask"].clone()) for b in batches)
        return batches, count

    trainer.get_batch_samples = recording
    trainer.train()
    masks = {
        tuple(ids): mask
        for ids, mask in zip(trainer.train_dataset["input_ids"], trainer.train_dataset[RESPONSE_MASK_COLUMN])
    }
    response_total = dropped_total = 0
    for ids, labels, attention in seen:
        for row_ids, row_labels, row_attention in zip(ids, labels, attention):
            n = int(row_attention.sum())
            mask = np.asarray(masks[tuple(row_ids[:n].tolist())], dtype=bool)
            mask[0] = False
            dropped = (row_labels[:n] == -100).numpy()
            dropped[0] = False
            assert not (dropped & ~mask).any()  # context never dropped
            response_total += int(mask.sum())
            dropped_total += int(dropped.sum())
    # The steps ranked exactly the assistant tokens and dropped the rest of their 40%.
    records = trainer.token_cleaning_state.report["steps"]
    assert sum(r["response_tokens"] for r in records) == response_total
    assert sum(r["response_tokens"] - r["kept_tokens"] for r in records) == dropped_total > 0


def test_prompt_completion_trained_whole_ranks_only_the_completion(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    dataset = Dataset.from_list(
        [{"prompt": f"Question {i}: what is {i} plus one?", "completion": f" It is {i + 1}."} for i in range(8)]
    )
    trainer = build(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, dataset, completion_only_loss=False)
    prepared = trainer.train_dataset
    assert prepared[0]["labels"] == prepared[0]["input_ids"]  # the prompt is trained too, as asked
    scored = trainer.score_tokens()
    for row, scores, keep in zip(prepared, scored["token_scores"], scored["token_keep"]):
        completion = np.asarray(row[RESPONSE_MASK_COLUMN], dtype=bool)
        completion[0] = False
        assert np.isnan(np.asarray(scores, dtype=np.float32)[~completion]).all()
        assert np.asarray(keep)[1:][~completion[1:]].all()
    assert trainer.token_cleaning_state.report["trained_non_response_tokens"] > 0
