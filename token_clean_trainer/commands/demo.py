"""`token-clean demo`: the fixed-model pipeline on the embedded model and data (see `token_clean_trainer.demo`)."""

import argparse
from dataclasses import fields


def demo_command(argv: list[str]) -> int:
    from ..demo import DemoSettings, run_demo

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
