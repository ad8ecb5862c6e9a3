"""The `token-clean` console script.

Subcommands available in this release: `demo` (the fixed-model pipeline on the embedded default) and `report`
(print a run's token-cleaning report). `train`, `score`, `validate` and `purge-mix` arrive with the recipe work.
"""

import argparse
import json
import os
import sys
from dataclasses import fields

# Default assets are local; never let a run reach the Hub (TRL also sends telemetry at start).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _demo(argv: list[str]) -> int:
    from .demo import DemoSettings, run_demo

    parser = argparse.ArgumentParser(
        prog="token-clean demo",
        description="Run the paper's fixed-model token-cleaning pipeline on SmolLM2-135M-Instruct and the ChatterBot "
        "corpus, offline, and print held-out response NLL for the base, plain SFT and the cleaned model.",
    )
    for f in fields(DemoSettings):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f"(default: {f.default})")
    args = parser.parse_args(argv)
    run_demo(DemoSettings(**vars(args)))
    return 0


def _report(argv: list[str]) -> int:
    from .report import print_summary

    parser = argparse.ArgumentParser(
        prog="token-clean report", description="Print the token-cleaning report of a run's output_dir."
    )
    parser.add_argument("output_dir", help="The `output_dir` of a token-cleaning run.")
    parser.add_argument("--json", action="store_true", help="Print the whole report.json instead of a summary.")
    args = parser.parse_args(argv)
    path = os.path.join(args.output_dir, "token_cleaning", "report.json")
    if not os.path.isfile(path):
        print(
            f"token-clean report: no report at {path}; is {args.output_dir!r} a token-cleaning run?", file=sys.stderr
        )
        return 2
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_summary(report)
    return 0


COMMANDS = {"demo": _demo, "report": _report}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: token-clean {" + ",".join(COMMANDS) + "} [options]   (token-clean <command> --help)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
