"""`report_to` integrations: what reaches W&B and TensorBoard, with fakes for `wandb` and the `SummaryWriter`.

The callbacks are transformers' own classes, built without their constructors (which import the real libraries);
only the library objects they hold (`callback._wandb`, `callback.tb_writer`) are fakes.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from transformers.integrations import TensorBoardCallback, WandbCallback

from token_clean_trainer.report import write_report
from token_clean_trainer.report.integrations import publish_to_integrations, report_scalars


class FakeWandb:
    """The parts of the `wandb` module that the report uses."""

    def __init__(self):
        self.run = SimpleNamespace(summary={})
        self.logged = []

    class Histogram:
        def __init__(self, np_histogram):
            self.counts, self.edges = np_histogram

    class Html:
        def __init__(self, data):
            self.data = data

    def log(self, values):
        self.logged.append(values)


class FakeWriter:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append(("scalar", tag, value, step))

    def add_histogram_raw(self, **kwargs):
        self.calls.append(("histogram", kwargs))

    def add_text(self, tag, text, step):
        self.calls.append(("text", tag, text, step))

    def flush(self):
        self.calls.append(("flush",))


def wandb_callback(wandb, initialized=True):
    callback = WandbCallback.__new__(WandbCallback)
    callback._wandb, callback._initialized = wandb, initialized
    return callback


def tensorboard_callback(writer):
    callback = TensorBoardCallback.__new__(TensorBoardCallback)
    callback.tb_writer = writer
    return callback


class FakeTrainer:
    def __init__(self, callbacks, step=0, main=True):
        self.callback_handler = SimpleNamespace(callbacks=list(callbacks))
        self.callback_handler.remove_callback = self.callback_handler.callbacks.remove
        self.accelerator = SimpleNamespace(is_main_process=main)
        self.state = SimpleNamespace(global_step=step)

    def add_callback(self, callback):
        self.callback_handler.callbacks.append(callback)


@pytest.fixture
def report_folder(tmp_path):
    scores = np.array([np.nan, 0.5, -1.0, 0.004, 2.0, np.nan, 0.0, 1.0], dtype=np.float32)
    report = {
        "mode": "fixed",
        "selection": "global",
        "ratio": 0.6,
        "threshold": 0.004,
        "rows": 2,
        "response_tokens": 6,
        "kept_tokens": 3,
        "kept_fraction": 0.5,
        "rows_all_masked": 0,
        "rows_without_response": 0,
        "scores": {
            "count": 6,
            "mean": float(np.nanmean(scores)),
            "std": float(np.nanstd(scores)),
            "p10": -0.5,
            "p50": 0.25,
            "p90": 1.5,
            "share_abs_below_0.01": 1 / 3,
            "share_within_0.01_of_threshold": 1 / 3,
        },
        "threshold_band": {"in_near_zero_band": True, "share_within_0.01": 1 / 3},
        "warnings": ["WARNING: the threshold +0.0040 lies in the near-zero band"],
        "reference": {"kind": "adapter"},
        "_histogram": {"scores": scores, "threshold": 0.004, "offsets": np.array([0, 5, 8])},
    }
    write_report(str(tmp_path), report)
    (tmp_path / "tokens.html").write_text("<html><body>page</body></html>")
    return tmp_path


def test_scalars_are_the_numeric_summary_fields(report_folder):
    report = json.loads((report_folder / "report.json").read_text())
    scalars = report_scalars(report)
    assert scalars["token_cleaning/kept_fraction"] == 0.5 and scalars["token_cleaning/threshold"] == 0.004
    assert scalars["token_cleaning/score_p50"] == 0.25
    assert scalars["token_cleaning/score_share_within_0.01_of_threshold"] == pytest.approx(1 / 3)
    assert scalars["token_cleaning/threshold_in_near_zero_band"] == 1.0
    assert "token_cleaning/mode" not in scalars and all(isinstance(v, float) for v in scalars.values())


def test_running_trackers_get_scalars_histogram_and_page_at_the_current_step(report_folder):
    wandb, writer = FakeWandb(), FakeWriter()
    trainer = FakeTrainer([wandb_callback(wandb), tensorboard_callback(writer)], step=7)
    assert publish_to_integrations(trainer, str(report_folder)) == ["wandb", "tensorboard"]

    assert wandb.run.summary["token_cleaning/kept_fraction"] == 0.5
    (logged,) = wandb.logged
    assert logged["train/global_step"] == 7
    histogram = logged["token_cleaning/score_histogram"]
    assert sum(histogram.counts) == 6 and len(histogram.edges) == len(histogram.counts) + 1
    assert logged["token_cleaning/tokens"].data == "<html><body>page</body></html>"

    scalars = {c[1]: (c[2], c[3]) for c in writer.calls if c[0] == "scalar"}
    assert scalars["token_cleaning/kept_fraction"] == (0.5, 7)
    (hist,) = [c[1] for c in writer.calls if c[0] == "histogram"]
    assert hist["tag"] == "token_cleaning/score_histogram" and hist["num"] == 6 and hist["global_step"] == 7
    assert hist["bucket_counts"] == histogram.counts and len(hist["bucket_limits"]) == len(hist["bucket_counts"])
    # The exact moments of the scores, not those of the clipped bins.
    assert hist["sum"] == pytest.approx(6 * float(np.nanmean([0.5, -1.0, 0.004, 2.0, 0.0, 1.0])), rel=1e-5)
    (text,) = [c for c in writer.calls if c[0] == "text"]
    assert "near-zero band" in text[2] and "kept tokens" in text[2]
    assert writer.calls[-1] == ("flush",)


def test_trackers_not_started_yet_get_the_report_when_training_begins(report_folder):
    wandb, writer = FakeWandb(), FakeWriter()
    wandb_cb, tb_cb = wandb_callback(wandb, initialized=False), tensorboard_callback(None)
    trainer = FakeTrainer([wandb_cb, tb_cb])
    assert publish_to_integrations(trainer, str(report_folder)) == []
    assert wandb.logged == [] and wandb.run.summary == {}
    # Scoring twice before training leaves one pending sender, not two.
    publish_to_integrations(trainer, str(report_folder))
    pending = trainer.callback_handler.callbacks[2:]
    assert len(pending) == 1

    # What Trainer does at on_train_begin: the trackers start first (they come first in the list), then ours.
    wandb_cb._initialized, tb_cb.tb_writer = True, writer
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    pending[0].on_train_begin(None, state, None)
    assert wandb.run.summary["token_cleaning/kept_fraction"] == 0.5 and len(wandb.logged) == 1
    assert any(c[0] == "histogram" for c in writer.calls)
    pending[0].on_train_begin(None, state, None)  # once only
    assert len(wandb.logged) == 1


def test_nothing_is_sent_without_trackers_or_off_the_main_process(report_folder):
    wandb = FakeWandb()
    assert publish_to_integrations(FakeTrainer([]), str(report_folder)) == []
    assert publish_to_integrations(FakeTrainer([wandb_callback(wandb)], main=False), str(report_folder)) == []
    assert wandb.logged == []


def test_a_tracker_error_is_logged_not_raised(report_folder, caplog):
    class BrokenWriter(FakeWriter):
        def add_scalar(self, *args):
            raise OSError("disk full")

    trainer = FakeTrainer([tensorboard_callback(BrokenWriter())])
    publish_to_integrations(trainer, str(report_folder))
    assert "Could not send the token-cleaning report to tensorboard: disk full" in caplog.text
