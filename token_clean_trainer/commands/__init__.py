"""The `token-clean` subcommands, one module each; `token_clean_trainer.cli` dispatches to them."""
