"""What `push_to_hub` / `save_model(push_to_hub=True)` would upload: the model and its card, never data-derived files.

No network: `HfApi.create_repo` and `HfApi.upload_folder` are replaced at the huggingface_hub boundary, and the upload
set is computed from the recorded arguments with huggingface_hub's own filter (the one `upload_folder` applies).
"""

import os

import pytest
from datasets import Dataset
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from peft import LoraConfig

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.hub import TOKEN_CLEANING_PAPER, hub_ignore_patterns

# Files a token-cleaning run (and the CLI around it) leaves in `output_dir` that hold training data or derive from it.
PRIVATE_FILES = [
    "purge_mix/dataset/data-00000-of-00001.arrow",
    "purge_mix/cache/requests.jsonl",
    "purge_mix/fusions.jsonl",
    "reference/adapter/adapter_model.safetensors",
    "reference/warmup.json",
    "self_evolving/round-1/checkpoint-2/token_cleaning_state.json",
    "token_scores/data-00000-of-00001.arrow",
    "token_scores.parquet",
    "score_cache/base/shard-0.safetensors",
    ".tmp-abc-report.json",
    "mix_out/.dataset.tmp-12-abcd/data-00000-of-00001.arrow",
]


class UploadRecorder:
    def __init__(self):
        self.calls = []

    def create_repo(self, api, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, **kwargs):
        self.calls.append(kwargs)
        return None

    def uploaded(self, call) -> list[str]:
        """The files `upload_folder` would send: its folder listing through the patterns it was given."""
        root = call["folder_path"]
        files = sorted(
            os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            for folder, _, names in os.walk(root)
            for name in names
        )
        return list(
            filter_repo_objects(
                files, allow_patterns=call.get("allow_patterns"), ignore_patterns=call["ignore_patterns"]
            )
        )


@pytest.fixture
def recorder(monkeypatch):
    recorder = UploadRecorder()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: recorder.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: recorder.upload_folder(api, **kw))
    return recorder


def _plant_private_files(output_dir: str) -> None:
    for name in PRIVATE_FILES:
        path = os.path.join(output_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("What is 1 plus 4? 1 plus 4 is 5.")  # a verbatim training row


def test_push_to_hub_uploads_the_model_and_card_but_no_data(tiny_model_dir, tiny_ref_dir, tmp_path, recorder):
    output_dir = tmp_path / "run"
    args = cpu_args(
        output_dir,
        token_cleaning="fixed",
        ref_model_name_or_path=tiny_ref_dir,
        score_cache_dir=str(output_dir / "score_cache"),
        hub_model_id="someone/tiny-cleaned",
    )
    trainer = TokenCleanSFTTrainer(
        tiny_model_dir,
        args=args,
        train_dataset=Dataset.from_list(arithmetic_rows(16)),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    trainer.train()
    _plant_private_files(str(output_dir))
    # The run itself wrote the report, the token sample (verbatim rows) and tokens.html.
    written = {n for n in os.listdir(output_dir / "token_cleaning")}
    assert {"report.json", "tokens_sample.json", "tokens.html"} <= written

    trainer.push_to_hub()

    (call,) = recorder.calls
    assert call["repo_id"] == "someone/tiny-cleaned" and call["folder_path"] == str(output_dir)
    uploaded = recorder.uploaded(call)
    leaked = [f for f in uploaded if f.startswith(("token_cleaning/", "purge_mix/", "reference/", "self_evolving/"))]
    leaked += [f for f in uploaded if f.startswith(("token_scores", "score_cache/")) or ".tmp-" in f]
    assert not leaked, f"would upload data-derived files: {leaked}"
    for name in PRIVATE_FILES:
        assert name not in uploaded, name
    # What a model repository needs is still there.
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json"} <= set(uploaded), (
        uploaded
    )
    # TRL's own ignore patterns are kept (checkpoint folders, private `_*` files).
    assert "checkpoint-*" in call["ignore_patterns"] and "_*" in call["ignore_patterns"]

    card = (output_dir / "README.md").read_text(encoding="utf-8")
    report = trainer.token_cleaning_state.report
    assert TOKEN_CLEANING_PAPER["id"] in card and "pang2025token" in card  # the paper and its citation
    assert "## Token cleaning" in card and "| `token_cleaning` | `fixed` |" in card
    assert "| `token_keep_ratio` | 0.6 |" in card and f"| kept fraction | {report['kept_fraction']:.4f} |" in card
    assert "1 plus 4" not in card and str(tmp_path) not in card  # no data, no local paths


def test_save_model_with_push_to_hub_goes_through_the_same_filter(tiny_model_dir, tmp_path, recorder):
    output_dir = tmp_path / "plain"
    args = cpu_args(output_dir, token_cleaning="none", push_to_hub=True, hub_model_id="someone/plain", max_steps=1)
    trainer = TokenCleanSFTTrainer(tiny_model_dir, args=args, train_dataset=Dataset.from_list(arithmetic_rows(8)))
    _plant_private_files(str(output_dir))
    trainer.save_model()
    (call,) = recorder.calls
    uploaded = recorder.uploaded(call)
    assert "model.safetensors" in uploaded
    # (no `score_cache_dir` is set here, so a folder of that name is the user's own and not filtered)
    private = [p for p in PRIVATE_FILES if not p.startswith("score_cache/")]
    assert not [f for f in uploaded if any(f == p or f.startswith(p.split("/")[0] + "/") for p in private)]
    # Cleaning off: the card is TRL's, without a token-cleaning section.
    assert "## Token cleaning" not in (output_dir / "README.md").read_text(encoding="utf-8")


def test_ignore_patterns_cover_a_cache_inside_the_output_dir_and_refuse_the_output_dir_itself(tmp_path):
    inside = hub_ignore_patterns(str(tmp_path), (str(tmp_path / "cache" / "scores"),))
    assert "cache/scores/*" in inside
    assert hub_ignore_patterns(str(tmp_path), (str(tmp_path.parent / "elsewhere"),)) == hub_ignore_patterns(
        str(tmp_path)
    )
    with pytest.raises(ValueError, match="score_cache_dir"):
        hub_ignore_patterns(str(tmp_path), (str(tmp_path),))
