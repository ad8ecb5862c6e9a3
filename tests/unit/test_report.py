"""The report on hand-built data: token decoding, row sampling, page escaping, per-round histograms, summary."""

import json
import re

import numpy as np
import pytest

from token_clean_trainer.report import histogram_data, regenerate, summary_lines, write_report
from token_clean_trainer.report.decode import token_texts
from token_clean_trainer.report.sample import build_token_sample, choose_rows
from token_clean_trainer.report.tokens_html import render_tokens_html


def test_byte_level_tokens_decode_to_the_text_with_real_whitespace(tokenizer):
    text = "Hello wörld\n\tcafé 😀 <script>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    texts, special = token_texts(tokenizer, ids)
    assert "".join(texts) == text
    assert "\n" in texts and "\t" in texts  # 'Ċ' and 'ĉ' become real whitespace
    assert not any(special)
    # The emoji spans two tokens; it appears whole on the token that completes it.
    assert any(t.endswith("😀") for t in texts) and not any("\ufffd" in t for t in texts)


def test_special_tokens_and_a_lone_partial_character(tokenizer):
    ids = tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"]
    texts, special = token_texts(tokenizer, ids)
    assert texts[0] == "<|im_start|>" and special[0] and not any(special[1:])
    # The first token of a split emoji alone: its bytes are shown rather than nothing.
    emoji = tokenizer(" 😀", add_special_tokens=False)["input_ids"]
    assert len(emoji) == 2
    first, _ = token_texts(tokenizer, emoji[:1])
    assert re.fullmatch(r" ?<[0-9a-f ]+>| ", first[0])


def test_choose_rows_takes_top_bottom_and_a_seeded_random_rest():
    rank = np.array([0.1, 0.9, 0.5, 0.0, 0.7, 0.3, 0.2, 0.8, 0.4, 0.6])
    eligible = np.ones(10, dtype=bool)
    eligible[3] = False  # no response token: never "bottom"
    chosen = dict(choose_rows(rank, eligible, total=8, seed=1))
    assert len(chosen) == 8
    assert [r for r, g in chosen.items() if g == "top"] == [1, 7]
    assert sorted(r for r, g in chosen.items() if g == "bottom") == [0, 6]
    assert sum(g == "random" for g in chosen.values()) == 4
    assert dict(choose_rows(rank, eligible, total=8, seed=1)) == chosen
    assert choose_rows(rank, eligible, total=20, seed=0) == [(i, "all") for i in range(10)]


def sample_arrays():
    # Two rows: 4 and 3 positions; position 0 of each row and the prompt are not response tokens.
    offsets = np.array([0, 4, 7])
    response = np.array([False, False, True, True, False, True, True])
    base = np.array([np.nan, np.nan, 2.0, 1.0, np.nan, 3.0, 0.5], dtype=np.float32)
    ref = np.array([np.nan, np.nan, 1.0, 1.5, np.nan, 1.0, 0.25], dtype=np.float32)
    keep = np.array([False, False, True, False, False, True, True])
    return offsets, response, base, ref, keep


class FakeTokenizer:
    """Maps id i to the i-th word; enough to test the sample's bookkeeping without a vocabulary."""

    words = ["<s>", "Q:", " hi", " </script><script>alert(1)</script>", "<s>", " a", " b"]
    all_special_ids = [0, 4]
    added_tokens_decoder = {}

    def convert_ids_to_tokens(self, ids):
        return [self.words[i] for i in ids]


def test_token_sample_fields_and_rank():
    offsets, response, base, ref, keep = sample_arrays()
    sample = build_token_sample(
        input_ids=[[0, 1, 2, 3], [4, 5, 6]],
        tokenizer=FakeTokenizer(),
        offsets=offsets,
        response=response,
        base_losses=base,
        ref_losses=ref,
        keep=keep,
        settings={"token_keep_ratio": 0.6},
    )
    first, second = sample["rows"]
    assert first["text"][3] == " </script><script>alert(1)</script>"
    assert first["special"] == [0] and second["special"] == [0]
    assert first["score"] == [None, None, 1.0, -0.5] and first["keep"] == [0, 0, 1, 0]
    assert first["kept_tokens"] == 1 and second["kept_tokens"] == 2
    assert first["rank"] == 0.5 and second["rank"] == 1.0
    assert sample["rows_total"] == 2 and sample["has_keep"] and sample["has_scores"]
    json.dumps(sample, allow_nan=False)  # no NaN reaches the JSON


def test_page_embeds_data_inertly_and_escapes_settings():
    offsets, response, base, ref, keep = sample_arrays()
    sample = build_token_sample(
        input_ids=[[0, 1, 2, 3], [4, 5, 6]],
        tokenizer=FakeTokenizer(),
        offsets=offsets,
        response=response,
        base_losses=base,
        ref_losses=ref,
        keep=keep,
        settings={"model": "<b>evil</b> __DATA__"},
    )
    page = render_tokens_html(sample, {"mode": "fixed", "selection": "global<i>"})
    assert "alert(1)" in page  # present, but only as escaped JSON
    assert "</script><script>alert" not in page
    assert page.count("<script") == 2 and "<b>evil" not in page and "&lt;b&gt;evil&lt;/b&gt; __DATA__" in page
    assert "global&lt;i&gt;" in page and "http://" not in page and "https://" not in page  # works offline
    data = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data)["rows"][0]["text"][3] == " </script><script>alert(1)</script>"


def test_histogram_has_one_panel_per_scored_round():
    scores = np.array([np.nan, np.nan, np.nan, 1.0, 2.0, np.nan, -1.0, 0.5, 0.25], dtype=np.float32)
    offsets = np.array([0, 3, 6, 9])
    report = {
        "mode": "self_evolving",
        "selection": "global",
        "response_tokens": 6,
        "kept_tokens": 4,
        "kept_fraction": 4 / 6,
        "rounds": [
            {"round": 0, "rows": [0, 1], "threshold": None},
            {"round": 1, "rows": [1, 2], "threshold": 1.5},
            {"round": 2, "rows": [2, 3], "threshold": 0.25},
        ],
    }
    data = histogram_data(scores, offsets, None, report)
    assert [p["label"] for p in data["panels"]] == ["round 1", "round 2"]
    assert [p["count"] for p in data["panels"]] == [2, 3]
    assert [p["threshold"] for p in data["panels"]] == [1.5, 0.25]
    assert all(sum(p["counts"]) == p["count"] for p in data["panels"])
    single = histogram_data(scores, offsets, 0.3, {**report, "rounds": None})
    assert len(single["panels"]) == 1 and single["panels"][0]["count"] == 5


def test_write_then_regenerate_from_stored_files(tmp_path):
    offsets, response, base, ref, keep = sample_arrays()
    report = {
        "mode": "fixed",
        "selection": "global",
        "ratio": 0.6,
        "threshold": 1.0,
        "rows": 2,
        "response_tokens": 4,
        "kept_tokens": 3,
        "kept_fraction": 0.75,
        "rows_all_masked": 0,
        "rows_without_response": 0,
        "_histogram": {"scores": base - ref, "threshold": 1.0, "offsets": offsets},
        "_tokens": build_token_sample(
            input_ids=[[0, 1, 2, 3], [4, 5, 6]],
            tokenizer=FakeTokenizer(),
            offsets=offsets,
            response=response,
            base_losses=base,
            ref_losses=ref,
            keep=keep,
            settings={},
        ),
    }
    write_report(str(tmp_path), report)
    assert "_tokens" not in json.loads((tmp_path / "report.json").read_text())
    for name in ("histogram.png", "tokens.html"):
        (tmp_path / name).unlink()
    written = regenerate(str(tmp_path))
    assert written["tokens"] and (tmp_path / "tokens.html").is_file()
    assert written["histogram"] and (tmp_path / "histogram.png").is_file()


def test_summary_table_lists_counts_and_rounds():
    report = {
        "mode": "self_evolving",
        "selection": "global",
        "ratio": 0.6,
        "rows": 10,
        "rows_without_response": 1,
        "rows_response_truncated": 0,
        "rows_all_masked": 2,
        "response_tokens": 100,
        "kept_tokens": 70,
        "kept_fraction": 0.7,
        "threshold": None,
        "scores": {"count": 60, "p10": -1.0, "p50": 0.1, "p90": 2.0, "share_abs_below_0.01": 0.05},
        "rounds": [
            {"round": 0, "rows": [0, 5], "response_tokens": 50, "kept_tokens": 50, "kept_fraction": 1.0},
            {
                "round": 1,
                "rows": [5, 10],
                "response_tokens": 50,
                "kept_tokens": 20,
                "kept_fraction": 0.4,
                "threshold": 0.3,
            },
        ],
    }
    text = "\n".join(summary_lines(report))
    assert "kept tokens" in text and "70 (70.00%)" in text
    assert "every response token dropped" in text
    assert re.search(r"\b1\s+5-10\s+50\s+20\s+40\.0%\s+\+0\.3000", text)
    per_step = {**report, "rounds": None, "kept_tokens": None, "kept_fraction": None}
    assert "chosen per optimizer step" in "\n".join(summary_lines(per_step))


@pytest.mark.parametrize("argv", [["/nonexistent/run"]])
def test_report_command_without_a_report(argv, capsys):
    from token_clean_trainer.commands.report import report_command

    assert report_command(argv) == 2
    assert "no report at" in capsys.readouterr().err


# --- the report explains itself: token table, near-zero band, user row ids, log-count histogram -------------------


class WordTokenizer(FakeTokenizer):
    """Ids 0..6 as words; 0 and 4 are special (e.g. the end-of-turn token)."""

    words = ["<eot>", " the", " cat", "\n", "<pad>", " sat", " mat"]
    all_special_ids = [0, 4]


def token_arrays():
    # Two rows; label 0 is the special end-of-turn token. Position 0 of each row is never a response token.
    offsets = np.array([0, 6, 11])
    labels = np.array([-100, 1, 2, 1, 3, 0, -100, -100, 1, 5, 0])
    response = labels != -100
    scores = np.array([np.nan, 0.5, -1.0, 0.25, 0.0, 2.0, np.nan, np.nan, 1.0, -0.5, 3.0])
    keep = np.array([0, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1], dtype=bool)
    return offsets, labels, response, scores, keep


def test_token_summary_counts_kept_share_and_mean_score_per_token_string():
    from token_clean_trainer.report import token_summary

    _, labels, response, scores, keep = token_arrays()
    summary = token_summary(labels, response, keep, scores, WordTokenizer())
    by_token = {e["token"]: e for table in ("kept", "dropped", "special") for e in summary[table]}
    the = by_token[" the"]  # three times, all kept: scores 0.5, 0.25, 1.0
    assert (the["count"], the["kept"], the["kept_share"]) == (3, 3, 1.0)
    assert the["mean_score"] == pytest.approx(1.75 / 3)
    assert [e["token"] for e in summary["kept"]] == [" the"]  # regular tokens only, most kept first
    assert [e["token"] for e in summary["dropped"]] == [" cat", "\n", " sat"]  # one drop each: ties by id
    assert by_token[" cat"]["kept_share"] == 0.0 and by_token[" cat"]["mean_score"] == -1.0
    special = summary["special"]  # listed apart, however often kept
    assert [(e["token"], e["count"], e["kept"], e["mean_score"]) for e in special] == [("<eot>", 2, 2, 2.5)]
    assert summary["distinct"] == 5
    # Per-step selection (no keep mask): one table by count, no kept share.
    per_step = token_summary(labels, response, None, scores, WordTokenizer())
    assert "kept" not in per_step and per_step["frequent"][0]["token"] == " the"
    assert per_step["frequent"][0]["kept_share"] is None
    # Chunked counting gives the same tables as one pass.
    import token_clean_trainer.report.statistics as report_module

    chunk = report_module.CHUNK_POSITIONS
    report_module.CHUNK_POSITIONS = 3
    try:
        assert token_summary(labels, response, keep, scores, WordTokenizer()) == summary
    finally:
        report_module.CHUNK_POSITIONS = chunk


def test_threshold_inside_the_near_zero_band_warns_with_the_share_around_it():
    from token_clean_trainer.report import threshold_band, threshold_warning

    scores = np.array([np.nan, -0.5, 0.001, 0.004, 0.009, 0.02, 1.0, np.nan, -0.006])
    band = threshold_band(scores, 0.004)
    # Within +-0.01 of 0.004: 0.001, 0.004, 0.009 and -0.006 -> 4 of 7 scored tokens.
    assert band == {"in_near_zero_band": True, "share_within_0.01": pytest.approx(4 / 7)}
    warning = threshold_warning({"threshold": 0.004, "threshold_band": band})
    assert warning.startswith("WARNING: the threshold +0.0040 lies in the near-zero band") and "57.1%" in warning
    outside = threshold_band(scores, 0.5)
    assert (
        not outside["in_near_zero_band"] and threshold_warning({"threshold": 0.5, "threshold_band": outside}) is None
    )
    assert threshold_band(scores, None) is None


def build(tokenizer=None, threshold=0.0, raw_rows=None, rows_in=2):
    from types import SimpleNamespace

    from token_clean_trainer.report import build_report

    offsets, labels, response, scores, keep = token_arrays()
    args = SimpleNamespace(
        max_length=None, token_cleaning="fixed", token_selection="global", token_keep_ratio=0.6,
        token_selection_seed=None, seed=0,
    )  # fmt: skip
    stats = {"rows_in": rows_in, "rows_without_response": rows_in - 2}
    if raw_rows is not None:
        stats["raw_rows"] = np.asarray(raw_rows)
    return build_report(
        args=args, lengths=np.diff(offsets), offsets=offsets, labels=labels, response=response, scores=scores,
        base_losses=scores, ref_losses=np.zeros_like(scores), keep=keep, threshold=threshold, prepare_stats=stats,
        cache_stats={}, reference={"kind": "adapter"}, seconds=0.0, tokenizer=tokenizer,
    )  # fmt: skip


def test_summary_and_page_show_the_warning_and_the_token_tables():
    report = build(tokenizer=WordTokenizer(), threshold=0.0)
    assert report["threshold_band"]["in_near_zero_band"] and len(report["warnings"]) == 1
    text = "\n".join(summary_lines(report))
    assert "WARNING: the threshold +0.0000 lies in the near-zero band" in text
    assert re.search(r'"<eot>"\s+2\s+100\.0%\s+\+2\.5000', text)  # special tokens, listed apart
    assert re.search(r'most often dropped.*\n\s+" cat"\s+1\s+0\.0%\s+-1\.0000', text)
    assert "within +-0.01 of threshold" in text
    page = render_tokens_html({"rows": [], "rows_total": 0, "sampling": {}}, report)
    assert '<p class="warning">WARNING: the threshold' in page
    assert "most often kept" in page and "special tokens" in page and "&quot;\\n&quot;" in page
    quiet = build(tokenizer=WordTokenizer(), threshold=0.75)
    assert quiet["warnings"] == [] and "WARNING" not in "\n".join(summary_lines(quiet))
    assert "warning" not in render_tokens_html({"rows": [], "rows_total": 0, "sampling": {}}, quiet).split("<body>")[1]


def test_row_ids_name_the_users_rows(tmp_path):
    # Prepared rows 0 and 1 are the user's rows 3 and 1 (TRL dropped rows 0 and 2 and shuffled the rest).
    offsets, labels, response, scores, keep = token_arrays()
    report = build(raw_rows=[3, 1], rows_in=4)
    assert report["row_ids"] == "dataset" and report["rows_without_response_ids"] == [0, 2]
    report["_tokens"] = build_token_sample(
        input_ids=[[0, 1, 2, 1, 3, 0], [4, 1, 1, 5, 0]], tokenizer=WordTokenizer(), offsets=offsets,
        response=response, base_losses=scores, ref_losses=np.zeros_like(scores), keep=keep, settings={},
    )  # fmt: skip
    write_report(str(tmp_path), report)
    stored = json.loads((tmp_path / "report.json").read_text())
    assert "_raw_rows" not in stored and stored["row_ids"] == "dataset"
    sample = json.loads((tmp_path / "tokens_sample.json").read_text())
    assert {r["row"]: r["dataset_row"] for r in sample["rows"]} == {0: 3, 1: 1}
    # Without the mapping (e.g. packing) row numbers are the prepared dataset's, and the report says so.
    assert build()["row_ids"] == "prepared" and "rows_without_response_ids" not in build()


def test_histogram_uses_a_log_count_axis(tmp_path, monkeypatch):
    import matplotlib.axes

    from token_clean_trainer.report import draw_histogram

    scales = []
    original = matplotlib.axes.Axes.set_yscale
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_yscale", lambda ax, v, **kw: (scales.append(v), original(ax, v, **kw))
    )
    data = histogram_data(np.array([0.0] * 1000 + [1.0, 2.0], dtype=np.float32), None, 0.5, build())
    assert draw_histogram(str(tmp_path / "h.png"), data) and scales == ["log"]


def test_page_draws_the_histogram_on_a_log_axis_with_the_threshold(tmp_path):
    from token_clean_trainer.report.histogram import histogram_svg

    scores = np.array([0.0] * 999 + [1.0, 2.0, np.nan], dtype=np.float32)
    data = histogram_data(scores, None, 0.5, build())
    svg = histogram_svg(data)
    bars = re.findall(r'<rect x="[^"]+" y="([^"]+)" width="[^"]+" height="([^"]+)"/>', svg)
    # 999 scores at 0; 1.0 and 2.0 share the top bin (the extreme 0.1% go into the end bins).
    assert len(bars) == sum(1 for c in data["panels"][0]["counts"] if c) == 2
    heights = sorted(float(h) for _, h in bars)
    # Log axis: the bar of 2 tokens is log(2)/log(999) of the tallest, not 2/999 of it.
    assert heights[-1] == pytest.approx(128.0) and heights[0] == pytest.approx(
        128 * np.log10(2) / np.log10(999), abs=0.1
    )
    assert "threshold +0.5000" in svg and 'class="thr"' in svg and "1,000" not in svg and ">100<" in svg
    assert histogram_svg(None) == "" and histogram_svg({"panels": [{"counts": []}]}) == ""
    # Written into the page with the report.
    offsets, response, base, ref, keep = sample_arrays()
    report = {**build(), "_histogram": {"scores": scores, "threshold": 0.5, "offsets": None}}
    report["_tokens"] = build_token_sample(
        input_ids=[[0, 1, 2, 3], [4, 5, 6]], tokenizer=FakeTokenizer(), offsets=offsets, response=response,
        base_losses=base, ref_losses=ref, keep=keep, settings={},
    )  # fmt: skip
    write_report(str(tmp_path), report)
    assert '<svg class="hist"' in (tmp_path / "tokens.html").read_text()


def test_masked_runs_count_consecutive_dropped_tokens_within_spans():
    from token_clean_trainer.report import masked_runs

    # Runs: [1, 2], [4] (a non-response position at 3 breaks it from [1, 2]), [6, 7, 8]; position 5 is kept.
    dropped = np.array([0, 1, 1, 0, 1, 0, 1, 1, 1, 0], dtype=bool)
    assert masked_runs(dropped) == {"count": 3, "tokens": 6, "mean_length": 2.0, "max_length": 3}
    assert masked_runs(np.array([1, 1], dtype=bool)) == {"count": 1, "tokens": 2, "mean_length": 2.0, "max_length": 2}
    assert masked_runs(np.zeros(4, dtype=bool)) == {"count": 0, "tokens": 0, "mean_length": None, "max_length": None}
    # The compact layout (response positions only): a run ends where the next response span begins.
    compact = np.array([1, 1, 1, 0, 1, 1], dtype=bool)
    # Spans [0, 1], [2, 3, 4], [5]: runs [0, 1], [2], [4], [5] (4 and 5 touch but lie in different spans).
    assert masked_runs(compact, span_starts=np.array([0, 2, 5])) == {
        "count": 4,
        "tokens": 5,
        "mean_length": 1.25,
        "max_length": 2,
    }


def _masked_runs_whole(dropped, span_starts=None):
    """`masked_runs` over the whole array at once (int64 boundaries of every run): the reference for the chunked one."""
    begins = dropped.copy()
    begins[1:] &= ~dropped[:-1]
    ends = dropped.copy()
    ends[:-1] &= ~dropped[1:]
    if span_starts is not None and len(span_starts):
        begins[span_starts] = dropped[span_starts]
        before = span_starts[span_starts > 0] - 1
        ends[before] = dropped[before]
    first, last = np.flatnonzero(begins), np.flatnonzero(ends)
    count, tokens = int(first.size), int(dropped.sum())
    return {
        "count": count,
        "tokens": tokens,
        "mean_length": tokens / count if count else None,
        "max_length": int((last - first).max()) + 1 if count else None,
    }


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 22])
def test_masked_runs_chunk_by_chunk_equal_the_whole_array(monkeypatch, chunk):
    from token_clean_trainer import selection
    from token_clean_trainer.report import masked_runs

    monkeypatch.setattr(selection, "_RUN_CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    for p in (0.0, 0.2, 0.7, 1.0):
        dropped = rng.random(50) < p
        spans = np.unique(np.concatenate([[0], rng.integers(0, 50, size=6)]))
        assert masked_runs(dropped) == _masked_runs_whole(dropped)
        assert masked_runs(dropped, span_starts=spans) == _masked_runs_whole(dropped, spans)


def test_report_summary_and_page_show_the_masked_runs_and_the_rule():
    from token_clean_trainer.report import add_step_summary

    # token_arrays: dropped response tokens at positions 2, 4 (row 0; 3 is kept) and 9 (row 1): three runs of one.
    report = build(tokenizer=WordTokenizer())
    assert report["masked_runs"] == {"count": 3, "tokens": 3, "mean_length": 1.0, "max_length": 1}
    assert (report["score_rule"], report["score_window"]) == ("excess", 1)
    assert "dropped tokens as runs" in "\n".join(summary_lines(report))
    page = render_tokens_html({"rows": [], "rows_total": 0, "sampling": {}}, report)
    assert "<th>masked runs</th><td>3 runs of consecutive dropped tokens, mean 1.00 tokens, longest 1</td>" in page
    assert "<th>rule</th><td>paper: top scores, per token</td>" in page
    span = dict(report, score_rule="junk_gate", score_window=5)
    assert "<th>rule</th><td>junk gate, window 5</td>" in render_tokens_html({"rows": [], "sampling": {}}, span)
    # Per-step runs: summed over the steps (dropped = response - kept), the longest over all steps.
    steps = [
        {"response_tokens": 10, "kept_tokens": 6, "rows_all_masked": 0, "masked_runs": 2, "masked_run_max": 3},
        {"response_tokens": 8, "kept_tokens": 6, "rows_all_masked": 0, "masked_runs": 1, "masked_run_max": 2},
    ]
    summary = add_step_summary({}, steps)["masked_runs"]
    assert summary == {"count": 3, "tokens": 6, "mean_length": 2.0, "max_length": 3}
    assert (
        add_step_summary({}, [{"response_tokens": 1, "kept_tokens": 1, "rows_all_masked": 0}])["masked_runs"] is None
    )


def test_report_modules_import_one_way_and_never_the_package_init():
    """Inside `token_clean_trainer/report/` no module imports one that imports it back, none imports the top-level
    package `__init__`, and importing the package leaves the trackers' module (and transformers) unloaded."""
    import ast
    import os
    import subprocess
    import sys

    import token_clean_trainer.report as package

    folder = os.path.dirname(package.__file__)
    modules = {name[:-3] for name in os.listdir(folder) if name.endswith(".py") and name != "__init__.py"}
    assert {"summary", "histogram", "tokens_html", "write", "terminal", "integrations"} <= modules
    imports = {}
    for module in modules:
        with open(os.path.join(folder, module + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module is not None, (
                    f"{module}.py imports a package __init__ (`from {'.' * node.level} import`)"
                )
                if node.level == 1:
                    assert node.module in modules, (module, node.module)
                    found.add(node.module)
        imports[module] = found

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for other in imports[todo.pop()] - seen:
                seen.add(other)
                todo.append(other)
        return seen

    assert [module for module in modules if module in reachable(module)] == []
    # The write path goes one way: write -> (histogram, tokens_html); neither of them reaches write or summary.
    assert {"histogram", "tokens_html"} <= imports["write"]
    assert not {"write", "summary"} & (reachable("histogram") | reachable("tokens_html"))
    code = (
        "import sys, token_clean_trainer.report as r; "
        "print(sorted(m for m in ('transformers', 'token_clean_trainer.report.integrations') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(folder))}  # this checkout's package
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]", completed.stdout
    assert package.publish_to_integrations.__module__ == "token_clean_trainer.report.integrations"


def test_the_hub_reads_the_report_through_load_report(tmp_path):
    from token_clean_trainer.hub import read_report
    from token_clean_trainer.report.run import load_report

    assert read_report(str(tmp_path)) is None  # no report written: the card goes without the numbers
    with pytest.raises(FileNotFoundError):
        load_report(str(tmp_path))
    (tmp_path / "token_cleaning").mkdir()
    (tmp_path / "token_cleaning" / "report.json").write_text('{"kept_fraction": 0.6}', encoding="utf-8")
    assert read_report(str(tmp_path)) == load_report(str(tmp_path)) == {"kept_fraction": 0.6}
