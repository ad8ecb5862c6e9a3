"""Self-evolving's LoRA merge under FSDP2 sharding equals the one-process merge (two rounds, 1e-5).

Under FSDP2 each process holds a block of rows of every weight; the merge adds `scaling * B_rows @ A` to its own rows
and draws the fresh adapter whole from the round's seed, keeping its rows. See scripts/fsdp2_lora_merge.py.
"""

import torch

from tests.conftest import assert_same_merge
from tests.integration.test_distributed import run


def test_sharded_merge_equals_one_process_merge(tmp_path, tiny_model_dir, tiny_ref_dir):
    for processes in (1, 2):
        assert run(tmp_path, processes, tiny_model_dir, tiny_ref_dir, script="fsdp2_lora_merge.py")["processes"] == (
            processes
        )
    one = torch.load(tmp_path / "result_fsdp2_lora_merge.py_1.json.pt")
    two = torch.load(tmp_path / "result_fsdp2_lora_merge.py_2.json.pt")
    assert_same_merge(one, two)
