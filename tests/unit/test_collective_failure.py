"""The failure channel of `Collective.together(..., runs_collectives=True)`, on an in-memory store, with threads."""

import time

import pytest
import torch

from token_clean_trainer import distributed
from token_clean_trainer.distributed import FAILURE_KEY, Collective, FailureWatch, announce_failure


@pytest.fixture
def exits(monkeypatch):
    """`os._exit` of the watch threads, recorded instead of ending the test process."""
    codes = []
    monkeypatch.setattr(distributed.os, "_exit", codes.append)
    monkeypatch.setattr(distributed, "POLL_SECONDS", 0.05)
    return codes


def test_a_watching_process_prints_the_failing_rank_and_exits(exits, capfd):
    store = torch.distributed.HashStore()
    watch = FailureWatch(store, rank=0, world=2)
    started = time.monotonic()
    announce_failure(store, 1, 2, ValueError("bad row"))
    # The failing process waited only until the other one had read its message, not `ANNOUNCE_WAIT_SECONDS`.
    assert time.monotonic() - started < 5
    watch._thread.join(timeout=5)
    assert exits == [1]
    err = capfd.readouterr().err
    assert "Process 1 of 2 failed while running collectives: ValueError: bad row. The other processes stop" in err
    assert "ValueError: bad row. Process 0 of 2 stops too (exit code 1)" in err


def test_a_stopped_watch_reads_nothing_and_ends_nothing(exits):
    store = torch.distributed.HashStore()
    watch = FailureWatch(store, rank=0, world=2)
    watch.stop()
    store.set(FAILURE_KEY, "late")
    time.sleep(0.2)
    assert exits == [] and not watch._thread.is_alive()


def test_an_unreachable_store_ends_the_watching_process(exits, capfd):
    class Gone:
        def check(self, keys):
            raise RuntimeError("Connection reset by peer")

    watch = FailureWatch(Gone(), rank=1, world=2)
    watch._thread.join(timeout=5)
    assert exits == [1]
    assert "The run's store stopped answering (RuntimeError: Connection reset by peer)" in capfd.readouterr().err


def test_one_process_raises_its_own_error_with_or_without_collectives():
    collective = Collective()
    for runs_collectives in (False, True):
        with pytest.raises(KeyError, match="x"):
            collective.together(lambda: {}["x"], runs_collectives=runs_collectives)
        assert collective.together(lambda: 3, runs_collectives=runs_collectives) == 3
