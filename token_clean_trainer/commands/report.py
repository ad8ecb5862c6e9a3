"""`token-clean report OUTPUT_DIR`: print a run's token-cleaning summary and rebuild its pages from stored files."""

import argparse
import json
import os
import sys


def report_command(argv: list[str]) -> int:
    """
    `token-clean report <output_dir>`: print a run's summary and rebuild `tokens.html` and `histogram.png` from the
    stored report files. Returns the exit status.
    """
    from ..report import print_summary, regenerate

    parser = argparse.ArgumentParser(
        prog="token-clean report",
        description="Print the token-cleaning summary of a run and rebuild its tokens.html and histogram.png from "
        "<output_dir>/token_cleaning/ (report.json, score_histogram.json, tokens_sample.json).",
    )
    parser.add_argument("output_dir", help="The `output_dir` of a token-cleaning run (or its token_cleaning/ folder).")
    parser.add_argument("--json", action="store_true", help="Print the whole report.json instead of the summary.")
    parser.add_argument("--no_regenerate", action="store_true", help="Only print; leave the files as they are.")
    args = parser.parse_args(argv)
    folder = args.output_dir
    if not os.path.isfile(os.path.join(folder, "report.json")):
        folder = os.path.join(args.output_dir, "token_cleaning")
    path = os.path.join(folder, "report.json")
    if not os.path.isfile(path):
        print(
            f"token-clean report: no report at {path}. Pass the `output_dir` of a run with token cleaning on "
            "(the report is written when scoring ends).",
            file=sys.stderr,
        )
        return 2
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    if not args.no_regenerate:
        try:
            regenerate(folder)
        except (OSError, ValueError) as error:
            print(f"token-clean report: could not rebuild the pages in {folder}: {error}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_summary(report, folder)
    return 0
