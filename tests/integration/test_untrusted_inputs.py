"""Datasets and model folders come from strangers, checked on the trainer itself: a reference folder that asks for
custom code is refused without running it, and report.json carries no dataset text."""

import json
import os
import pathlib

import pytest


@pytest.fixture
def hostile_model_dir(tmp_path, tiny_model_dir):
    """A model folder whose config asks for custom code that, if ever imported, leaves a marker file."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    for name in os.listdir(tiny_model_dir):
        (folder / name).write_bytes((pathlib.Path(tiny_model_dir) / name).read_bytes())
    marker = tmp_path / "remote_code_ran"
    (folder / "hostile_config.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\n\n\n"
        "class HostileConfig(LlamaConfig):\n    model_type = 'hostile'\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="hostile", auto_map={"AutoConfig": "hostile_config.HostileConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_a_reference_with_custom_code_is_refused_without_running_it(
    tmp_path, tiny_model_dir, tokenizer, hostile_model_dir
):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from tests.conftest import arithmetic_rows, cpu_args
    from token_clean_trainer import TokenCleanSFTTrainer

    folder, marker = hostile_model_dir
    with pytest.raises(ValueError, match="(?s)Cannot load the reference model config.*trust_remote_code=True"):
        TokenCleanSFTTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=cpu_args(tmp_path / "out", ref_model_name_or_path=str(folder)),
            train_dataset=Dataset.from_list(arithmetic_rows(4)),
            processing_class=tokenizer,
        )
    assert not marker.exists()


def test_report_json_carries_no_dataset_text(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from tests.conftest import cpu_args
    from token_clean_trainer import TokenCleanSFTTrainer

    planted = "zq<script>alert('x')</script>"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Say {planted} number {i}."}],
            "completion": [{"role": "assistant", "content": f"{planted} {i}"}],
        }
        for i in range(6)
    ]
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(tmp_path, ref_model_name_or_path=tiny_ref_dir),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.score_tokens()
    text = (tmp_path / "token_cleaning" / "report.json").read_text()
    json.loads(text)  # valid JSON whatever the data held
    assert "<script>" not in text and "alert(" not in text
