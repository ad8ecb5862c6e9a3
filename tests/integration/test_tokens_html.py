"""tokens.html written at the end of scoring, rendered in headless Chromium: tokens, marks, search, escaping."""

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from datasets import Dataset

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.commands.report import report_command

INJECTION = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\"> & done"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = (
            "headless Chromium is not installed (`make test` installs Debian's `chromium` when it runs as root with "
            "apt-get); the page's rendering is not checked here"
        )
        if os.environ.get("TOKEN_CLEAN_REQUIRE_BROWSER") == "1":  # CI: a browser is expected
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def dump_dom(page: str, tmp_path, fragment: str = "") -> str:
    """The DOM after the page's scripts ran (Chromium's --dump-dom), loaded from a file URL with `#fragment`."""
    profile = tmp_path / "chromium-profile"
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        f"file://{os.path.abspath(page)}{fragment}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Dom(HTMLParser):
    """Token spans grouped by sample, plus every element's tag, from a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.samples: list[dict] = []
        self.tags: list[str] = []
        self.title = ""
        self._span: dict | None = None
        self._in_title = False
        self.body_attrs: dict = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "body":
            self.body_attrs = attrs
        if tag == "title":
            self._in_title = True
        if tag == "section" and "sample" in (attrs.get("class") or ""):
            self.samples.append({"row": int(attrs["data-row"]), "tokens": []})
        if tag == "span" and "tok" in (attrs.get("class") or "").split() and "data-i" in attrs and self.samples:
            self._span = {"classes": attrs["class"].split(), "keep": attrs.get("data-k"), "text": ""}
            self.samples[-1]["tokens"].append(self._span)

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._span is not None:
            self._span["text"] += data
        if self._in_title:
            self.title += data


def parse(dom: str) -> Dom:
    parser = Dom()
    parser.feed(dom)
    return parser


@pytest.fixture(scope="module")
def cleaned_run(tmp_path_factory, tiny_model_dir, tiny_ref_dir, tokenizer):
    """A fixed-mode scoring run of the tiny model against a full-model reference, one row carrying HTML."""
    out = tmp_path_factory.mktemp("tokens_html")
    rows = arithmetic_rows(11)
    rows.append(
        {
            "prompt": [{"role": "user", "content": "Show me some markup, café 😀."}],
            "completion": [{"role": "assistant", "content": INJECTION}],
        }
    )
    trainer = TokenCleanSFTTrainer(
        tiny_model_dir,
        args=cpu_args(
            out,
            token_cleaning="fixed",
            token_selection="global",
            token_keep_ratio=0.5,
            ref_model_name_or_path=tiny_ref_dir,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.score_tokens()
    return out, trainer


def test_scoring_writes_the_page_and_its_sample(cleaned_run, tokenizer):
    out, trainer = cleaned_run
    folder = out / "token_cleaning"
    for name in ("report.json", "histogram.png", "score_histogram.json", "tokens_sample.json", "tokens.html"):
        assert (folder / name).is_file(), name
    sample = json.loads((folder / "tokens_sample.json").read_text())
    state = trainer.token_cleaning_state
    assert sample["rows_total"] == sample["rows_shown"] == len(trainer.train_dataset)
    ids = trainer.train_dataset["input_ids"]
    base_losses = trainer.token_losses(trainer.train_dataset, role="base")  # freed from the state after selection
    for row in sample["rows"]:
        begin, end = state.offsets[row["row"]], state.offsets[row["row"] + 1]
        # Every token of the row, in order, decoding back to the row's text.
        assert len(row["text"]) == len(ids[row["row"]]) == end - begin
        assert "".join(row["text"]) == tokenizer.decode(ids[row["row"]])
        keep = np.asarray(row["keep"], dtype=bool)
        np.testing.assert_array_equal(keep, state.keep[begin:end])
        assert row["kept_tokens"] == int(keep.sum())
        score = np.array([np.nan if v is None else v for v in row["score"]], dtype=np.float64)
        np.testing.assert_allclose(score, state.scores[begin:end], atol=1e-4, equal_nan=True)
        base = np.array([np.nan if v is None else v for v in row["base"]], dtype=np.float64)
        np.testing.assert_allclose(base, base_losses[begin:end], atol=1e-4, equal_nan=True)
    settings = sample["settings"]
    assert settings["token_keep_ratio"] == 0.5 and settings["token_cleaning"] == "fixed"


def test_page_renders_tokens_marks_and_search_in_chromium(cleaned_run, tmp_path):
    out, trainer = cleaned_run
    page = out / "token_cleaning" / "tokens.html"
    sample = json.loads((out / "token_cleaning" / "tokens_sample.json").read_text())
    dom = parse(dump_dom(page, tmp_path))
    assert len(dom.samples) == sample["rows_shown"]
    by_row = {s["row"]: s for s in dom.samples}
    for row in sample["rows"]:
        spans = by_row[row["row"]]["tokens"]
        assert len(spans) == len(row["text"])
        for span, response, keep in zip(spans, row["response"], row["keep"]):
            if not response:
                assert "prompt" in span["classes"]
            else:
                assert ("dropped" in span["classes"]) == (not keep)
                assert span["keep"] == ("1" if keep else "0")
    # Sorted most-kept first by default.
    fractions = [sample["rows"][[r["row"] for r in sample["rows"]].index(s["row"])] for s in dom.samples]
    kept = [r["kept_tokens"] / max(r["response_tokens"], 1) for r in fractions]
    assert kept == sorted(kept, reverse=True)

    # Search through the URL fragment: only the rows whose text contains "7 plus 10" remain (case-insensitive).
    searched = parse(dump_dom(page, tmp_path, "#q=7%20PLUS%2010&sort=least"))
    expected = [r["row"] for r in sample["rows"] if "7 plus 10" in "".join(r["text"]).lower()]
    assert len(expected) == 1
    assert [s["row"] for s in searched.samples] == expected
    assert searched.body_attrs.get("data-shown") == "1"


def test_html_in_the_data_is_shown_as_text(cleaned_run, tmp_path):
    out, _ = cleaned_run
    page = out / "token_cleaning" / "tokens.html"
    raw = page.read_text(encoding="utf-8")
    assert "<img" not in raw and "document.title='pwned'</script>" not in raw
    dom = parse(dump_dom(page, tmp_path, "#q=markup"))
    assert dom.title.startswith("token cleaning") and "pwned" not in dom.title
    assert "img" not in dom.tags
    assert dom.tags.count("script") == 2  # the page's data and code, nothing from the dataset
    (row,) = dom.samples
    text = "".join(span["text"] for span in row["tokens"])
    assert INJECTION in text and "café 😀" in text


def test_report_command_rebuilds_the_page_from_stored_files(cleaned_run, capsys):
    out, _ = cleaned_run
    folder = out / "token_cleaning"
    (folder / "tokens.html").unlink()
    (folder / "histogram.png").unlink()
    assert report_command([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept tokens" in printed and "tokens.html" in printed
    assert (folder / "tokens.html").is_file() and (folder / "histogram.png").is_file()
    assert report_command([str(out / "missing")]) == 2
