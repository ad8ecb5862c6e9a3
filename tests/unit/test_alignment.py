"""Per-token losses land on label positions, whatever the padding side, with pad == eos."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset

from token_clean_trainer.scoring import align_token_losses, compute_token_losses, token_losses

nan = float("nan")
EOS = PAD = 2


def test_right_padding_hand_built():
    # Row: [bos, p, r1, r2, eos] + 1 pad; labels mask the prompt. log_probs[i] predicts token i + 1.
    labels = torch.tensor([[-100, -100, 11, 12, EOS, -100]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0]])
    log_probs = -torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    losses = align_token_losses(log_probs, labels, attention)
    expected = [nan, nan, 0.2, 0.3, 0.4, nan]  # position j gets -log_probs[j - 1]; the pad's slot stays NaN
    np.testing.assert_allclose(losses[0].numpy(), expected, rtol=1e-6)


def test_left_padding_hand_built_with_pad_equal_to_eos():
    # Two pads on the left, whose id equals eos; the first real token is predicted from padding: never scored.
    labels = torch.tensor([[-100, -100, EOS, 11, EOS]])
    attention = torch.tensor([[0, 0, 1, 1, 1]])
    log_probs = -torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    losses = align_token_losses(log_probs, labels, attention)
    np.testing.assert_allclose(losses[0].numpy(), [nan, nan, nan, 0.3, 0.4], rtol=1e-6)


def test_pad_id_in_labels_is_not_dropped_when_attended():
    # A real end-of-turn token whose id equals pad is scored because the attention mask says it is real.
    labels = torch.tensor([[-100, 11, PAD, -100]])
    attention = torch.tensor([[1, 1, 1, 0]])
    losses = align_token_losses(-torch.tensor([[0.5, 0.7, 0.9]]), labels, attention)
    assert math.isclose(losses[0, 2].item(), 0.7, rel_tol=1e-6) and math.isnan(losses[0, 3].item())


def _reference_losses(model, ids, labels):
    """Plain full-logits cross-entropy on the unpadded row, aligned by hand."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    ce = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none").numpy()
    out = np.full(len(ids), np.nan, np.float32)
    for j in range(1, len(ids)):
        if labels[j] != -100:
            out[j] = ce[j - 1]
    return out


def test_fused_scoring_matches_cross_entropy_for_right_and_left_padding(tokenizer):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tokenizer, seed=3).eval()
    eos = tokenizer.eos_token_id
    rows = [
        {"input_ids": [1, 50, 51, 52, 53, eos], "labels": [-100, -100, -100, 52, 53, eos]},
        {"input_ids": [1, 60, 61, eos], "labels": [-100, -100, 61, eos]},
        {"input_ids": [1, 70, eos, 71, 72, 73, 74, eos], "labels": [-100, -100, -100, 71, 72, 73, 74, eos]},
    ]
    dataset = Dataset.from_list(rows)
    got = compute_token_losses(model, dataset, range(3), batch_size=3, pad_token_id=eos)
    for row, losses in zip(rows, got):
        np.testing.assert_allclose(losses, _reference_losses(model, row["input_ids"], row["labels"]), atol=1e-5)

    # The same rows left-padded by hand (pad == eos): the first real token is never scored, padding never is.
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((3, length), eos)
    labels = torch.full((3, length), -100)
    attention = torch.zeros((3, length), dtype=torch.long)
    position_ids = torch.zeros((3, length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, length - n :] = torch.tensor(r["input_ids"])
        labels[i, length - n :] = torch.tensor(r["labels"])
        attention[i, length - n :] = 1
        position_ids[i, length - n :] = torch.arange(n)
    aligned = token_losses(model, ids, attention, labels, position_ids=position_ids).numpy()
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        np.testing.assert_allclose(
            aligned[i, length - n :], _reference_losses(model, r["input_ids"], r["labels"]), atol=1e-5
        )


def test_scoring_restores_forward_and_training_mode(tokenizer):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tokenizer, seed=3)
    model.train()
    dataset = Dataset.from_list([{"input_ids": [1, 5, 2], "labels": [-100, 5, 2]}])
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    compute_token_losses(model, dataset, [0], batch_size=1, pad_token_id=2)
    assert torch.rand(1).item() == expected_next.item()  # no global RNG consumed
    assert model.training and "forward" not in vars(model)
