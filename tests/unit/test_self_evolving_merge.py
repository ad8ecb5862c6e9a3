"""`merge_and_reset_adapter`: the paper's LoRA handling between self-evolving rounds, on a tiny PEFT model."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.conftest import make_tiny_llama
from token_clean_trainer.self_evolving import merge_and_reset_adapter


def tiny_peft(tokenizer, **lora):
    model = make_tiny_llama(tokenizer, seed=0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **lora)
    model = get_peft_model(model, config)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: B is no longer zero
            param.data.normal_(std=0.5)
    return model.eval()


def logits(model, ids, adapters=True):
    with torch.no_grad():
        if adapters:
            return model(input_ids=ids).logits
        with model.disable_adapter():
            return model(input_ids=ids).logits


def test_merge_keeps_the_model_and_starts_a_fresh_adapter(tokenizer):
    model = tiny_peft(tokenizer)
    ids = torch.tensor([tokenizer.encode("What is 2 plus 3? It is 5.")])
    adapted, base = logits(model, ids), logits(model, ids, adapters=False)
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapter changes the model
    parameters = {name: param for name, param in model.named_parameters()}
    rng = torch.get_rng_state()

    merge_and_reset_adapter(model, seed=5)

    assert torch.equal(torch.get_rng_state(), rng)  # training randomness untouched
    # Same objects (the trainer and accelerate keep their references), new values.
    assert {name: param for name, param in model.named_parameters()}.keys() == parameters.keys()
    assert all(param is parameters[name] for name, param in model.named_parameters())
    # The model is unchanged: the round's delta moved into the weights and the fresh adapter adds nothing yet.
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
    # With adapters off, the model is now the merged one: the next round's reference, not the original base.
    torch.testing.assert_close(logits(model, ids, adapters=False), adapted, rtol=1e-5, atol=1e-5)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    assert all(torch.count_nonzero(p) > 0 for p in lora_a)
    assert all(p.requires_grad for p in lora_a + lora_b)
    assert not any(layer.merged_adapters for layer in model.modules() if hasattr(layer, "merged_adapters"))

    # A second round's adapter, trained, is merged on top of the first: deltas accumulate.
    for p in lora_b:
        p.data.normal_(std=0.5)
    second = logits(model, ids)
    merge_and_reset_adapter(model, seed=6)
    torch.testing.assert_close(logits(model, ids, adapters=False), second, rtol=1e-5, atol=1e-5)


def test_fresh_adapter_is_seeded(tokenizer):
    a, b = tiny_peft(tokenizer), tiny_peft(tokenizer)
    merge_and_reset_adapter(a, seed=3)
    merge_and_reset_adapter(b, seed=3)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def test_modules_to_save_move_into_the_base(tokenizer):
    model = tiny_peft(tokenizer, modules_to_save=["norm"])  # the final RMSNorm, trained whole
    wrapper = model.base_model.model.model.norm
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(0.5)
    ids = torch.tensor([tokenizer.encode("Hello there")])
    adapted = logits(model, ids)
    merge_and_reset_adapter(model, seed=0)
    torch.testing.assert_close(logits(model, ids, adapters=False), adapted, rtol=1e-5, atol=1e-5)


def test_dora_is_refused_with_the_alternative(tokenizer):
    model = tiny_peft(tokenizer, use_dora=True)
    with pytest.raises(ValueError, match="self_evolving_lora='continue'"):
        merge_and_reset_adapter(model, seed=0)
