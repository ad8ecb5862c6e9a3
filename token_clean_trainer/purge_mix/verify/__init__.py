"""Verifiers of fused pairs: deterministic checks of correctness (sandboxed code execution, arithmetic, grounding in
the sources) and a calibrated LLM judge for what none of them covers. Each returns a [`base.Verdict`]."""
