"""The float32 LM head of the scoring forward: no full float32 copy of a bf16 head, and `torch.compile`d models."""

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from token_clean_trainer import scoring
from token_clean_trainer.scoring import token_losses, unwrap_causal_lm


class _LargestFloat32Tensor(TorchDispatchMode):
    """Records the element count of the largest float32 tensor any op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


def _batch(vocab: int):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 12), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, torch.ones_like(ids), labels


def _full_copy_losses(model, ids, attention, labels) -> torch.Tensor:
    """What the head computed before: the whole head cast to float32 at once (the expected values)."""
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state.float()
        logits = hidden[:, :-1] @ model.lm_head.weight.float().T
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
    return torch.where(labels[:, 1:] != -100, losses, torch.nan)


def test_bf16_head_is_never_copied_to_float32_whole(tokenizer, monkeypatch):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tokenizer, seed=3).to(torch.bfloat16).eval()
    vocab, width = model.lm_head.weight.shape
    # Blocks of 4096 vocabulary rows, as a 4096-wide head gets at the default block size.
    monkeypatch.setattr(scoring, "_HEAD_BLOCK_ELEMENTS", 4096 * width)
    ids, attention, labels = _batch(vocab)
    with _LargestFloat32Tensor() as watch:
        got = token_losses(model, ids, attention, labels)
    assert watch.largest < vocab * width // 4, "the head was cast to float32 whole"
    expected = _full_copy_losses(model, ids, attention, labels)
    assert torch.isnan(got[:, 0]).all()
    np.testing.assert_allclose(got[:, 1:].numpy(), expected.numpy(), rtol=1e-6, atol=1e-5)


def test_float32_head_in_one_block_equals_the_plain_computation(tokenizer):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tokenizer, seed=4).eval()
    ids, attention, labels = _batch(model.config.vocab_size)
    got = token_losses(model, ids, attention, labels)
    expected = _full_copy_losses(model, ids, attention, labels)
    np.testing.assert_allclose(got[:, 1:].numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_compiled_model_is_scored_through_its_root_module(tokenizer):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tokenizer, seed=5).eval()
    compiled = torch.compile(model, backend="eager")
    assert unwrap_causal_lm(compiled) is model
    compiled_forward = vars(compiled).get("forward")  # OptimizedModule keeps its own instance forward
    root_calls = []
    # FSDP2 gathers the root's parameters in a forward pre-hook of the root module: scoring must run it.
    handle = model.register_forward_pre_hook(lambda module, args: root_calls.append(1))
    ids, attention, labels = _batch(model.config.vocab_size)
    try:
        got = token_losses(compiled, ids, attention, labels)
    finally:
        handle.remove()
    assert root_calls == [1]
    assert "forward" not in vars(model) and vars(compiled).get("forward") is compiled_forward
    np.testing.assert_allclose(got.numpy(), token_losses(model, ids, attention, labels).numpy(), atol=0, rtol=0)
