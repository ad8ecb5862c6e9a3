"""Run purge-mix on the arithmetic rows with a local model: the process a kill -9 test kills mid-run.

python tests/integration/scripts/purge_mix_run.py MODEL_DIR OUTPUT_DIR
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

from datasets import Dataset  # noqa: E402

from tests.conftest import arithmetic_rows  # noqa: E402
from token_clean_trainer.purge_mix import PurgeMixConfig, run_purge_mix  # noqa: E402


def config(model_dir: str) -> PurgeMixConfig:
    return PurgeMixConfig(
        purge_mix_scoring_model_name_or_path=model_dir,
        purge_mix_embedding="base_model",
        purge_mix_output_mode="synthesized",
        purge_mix_hq_min_score=5,
        purge_mix_curation=False,
        purge_mix_max_ifd=None,
        purge_mix_min_pair_similarity=None,  # a random model's hidden states: cosine says nothing, all 20 pairs
        purge_mix_num_clusters=1,
        purge_mix_representatives=40,
        purge_mix_max_fusions=20,
        purge_mix_generation_batch_size=1,  # one request per generate(): the cache grows request by request
        purge_mix_max_new_tokens=24,
        purge_mix_temperature=1.0,
    )


def main() -> None:
    model_dir, output_dir = sys.argv[1], sys.argv[2]
    run_purge_mix(Dataset.from_list(arithmetic_rows(48)), config(model_dir), output_dir, seed=0)


if __name__ == "__main__":
    main()
