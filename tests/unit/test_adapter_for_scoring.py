"""`adapter_for_scoring`: a scoring forward with the adapters off (or the reference adapter on) that leaves every
parameter as trainable as training needs it (FSDP2 fixes a unit's gradient dtype at its first forward)."""

import torch
from peft import LoraConfig, get_peft_model

from tests.conftest import make_tiny_llama
from token_clean_trainer.reference import REF_ADAPTER_NAME, adapter_for_scoring


def trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_adapters_off_and_reference_adapter_keep_the_trainable_parameters(tokenizer, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(make_tiny_llama(tokenizer, seed=0), config).eval()
    model.save_pretrained(tmp_path / "ref")  # another adapter on the same base: the reference adapter
    model.load_adapter(str(tmp_path / "ref"), adapter_name=REF_ADAPTER_NAME, is_trainable=False)
    before = trainable(model)
    assert before and all(".default." in name for name in before)  # the trained LoRA only
    ids = torch.tensor([tokenizer.encode("What is 2 plus 3? It is 5.")])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            assert not trainable(model)  # what PEFT does alone: the disabled LoRA is frozen
            base = model(input_ids=ids).logits
        assert trainable(model) == before
        with adapter_for_scoring(model, None):
            assert trainable(model) == before
            torch.testing.assert_close(model(input_ids=ids).logits, base)  # the adapters are still off
        with adapter_for_scoring(model, REF_ADAPTER_NAME):
            assert trainable(model) == before
            assert model.active_adapter == REF_ADAPTER_NAME
    assert trainable(model) == before and model.active_adapter == "default"
    assert not torch.allclose(adapted, base)
