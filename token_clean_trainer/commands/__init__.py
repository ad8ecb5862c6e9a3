"""The `token-clean` scripts beside the front door (`token_clean_trainer.cli` dispatches to them).

One module per subcommand (`train.py` for `train` and `score`, `score.py` for `score --shard I/N`, `validate.py`,
`purge_mix.py`, `evaluate.py`, `report.py`, `demo.py`), plus what they share: `recipe.py` (a recipe's dataclasses, parser and checks), `launch.py`
(the `accelerate launch` relaunch, process exit) and `lookup.py` (accelerate configs by name, "did you mean" hints).
"""
