"""An error on one process inside sharded scoring forwards stops every process within seconds, not `ddp_timeout`.

Two CPU processes over gloo score an FSDP2-sharded model (scripts/scoring_failure.py); a forward hook raises on
process 1 at its first scoring forward, while process 0 waits in the all-gather of the same forward. `ddp_timeout`
stays at 30 minutes. Both processes must have ended within 60 s of the start of scoring, and the output must name
the failing process and its error.
"""

import os
import time

from tests.conftest import accelerate_launch

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "scoring_failure.py")

INJECTED = "injected scoring failure"


def test_an_error_in_a_sharded_forward_on_one_process_stops_every_process(tmp_path, tiny_model_dir, tiny_ref_dir):
    started_path = tmp_path / "scoring_started"
    out_dir = str(tmp_path / "out")
    # A hang would end in this timeout (subprocess.TimeoutExpired), well before `ddp_timeout`.
    completed = accelerate_launch(
        ["--multi_gpu"], 2, SCRIPT, tiny_model_dir, tiny_ref_dir, out_dir, str(started_path), timeout=240
    )
    ended = time.time()
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output[-4000:]
    assert started_path.exists(), output[-4000:]  # the failure came from scoring, not from setting up
    assert ended - float(started_path.read_text()) < 60, output[-4000:]
    # The failing process's own error, and the other process's account of it naming process 1.
    assert f"RuntimeError: {INJECTED}" in output, output[-4000:]
    assert f"Process 1 of 2 failed while running collectives: RuntimeError: {INJECTED}" in output, output[-4000:]
