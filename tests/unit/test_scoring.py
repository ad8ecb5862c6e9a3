def test_scoring_under_deepspeed_runs_in_the_engines_precision():
    # DeepSpeed casts the weights to its config's dtype and trains without autocast: scoring does the same.
    from types import SimpleNamespace

    from token_clean_trainer.scoring import scoring_mixed_precision

    deepspeed = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=object()), mixed_precision="bf16")
    plain = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None), mixed_precision="bf16")
    assert scoring_mixed_precision(deepspeed) == "no"
    assert scoring_mixed_precision(plain) == "bf16"
    assert scoring_mixed_precision(SimpleNamespace(state=plain.state, mixed_precision=None)) == "no"
