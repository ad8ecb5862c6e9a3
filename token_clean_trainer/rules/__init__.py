"""
Selection rules as plug-ins: the registry of every rule, by name.

Each rule is one module of this package exposing `RULE`, a [`~rules.base.Rule`]; the registry below lists them.
Config choices and validation, the three modes, the report's labels and the demo read it. Adding a rule is one new
module and one entry in `RULES` (see `docs/adding-a-selection-rule.md`).
"""

from . import excess, full, junk_gate, random
from .base import LEVELS, QUANTITIES, Quantities, Rule, excess_loss

# The registry: name -> rule. Ranking rules are configured as `token_score_rule`, baselines as `token_selection`.
RULES: dict[str, Rule] = {rule.name: rule for rule in (excess.RULE, junk_gate.RULE, random.RULE, full.RULE)}

# The paper's rule: the default `token_score_rule`.
DEFAULT_RULE = "excess"


def choices(names) -> str:
    """Names as a message lists them: `'a' or 'b'`, `'a', 'b' or 'c'`."""
    names = [repr(name) for name in names]
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def get_rule(name: str) -> Rule:
    """The registered rule called `name`; a `ValueError` listing the choices when there is none."""
    rule = RULES.get(name) if isinstance(name, str) else None
    if rule is None:
        raise ValueError(f"Unknown token selection rule {name!r}; choose {choices(RULES)}.")
    return rule


def check_score_rule(name: str) -> Rule:
    """The rule `token_score_rule` names; a `ValueError` naming the field and its choices (the ranking rules)."""
    if name not in score_rules():
        raise ValueError(f"`token_score_rule` must be {choices(score_rules())}, got {name!r}.")
    return get_rule(name)


def score_rules() -> tuple[str, ...]:
    """The names `token_score_rule` accepts: every registered rule that ranks scores."""
    return tuple(name for name, rule in RULES.items() if not rule.baseline)


def baselines() -> tuple[str, ...]:
    """The baselines `token_selection` accepts besides its levels (the paper's "random" and "full")."""
    return tuple(name for name, rule in RULES.items() if rule.baseline)


def configured_rule(args) -> tuple[Rule, str]:
    """`(rule, level)` of a config: a baseline named by `token_selection` (ranked over everything), else the
    `token_score_rule` at the `token_selection` level."""
    if args.token_selection in baselines():
        return get_rule(args.token_selection), "global"
    return get_rule(args.token_score_rule), args.token_selection


def rule_label(name: str | None) -> str | None:
    """The label the report and the token page show for a rule name (the name itself when not registered, e.g. a
    report written by another version)."""
    if name is None:
        return None
    return RULES[name].label if name in RULES else str(name)


__all__ = [
    "DEFAULT_RULE",
    "LEVELS",
    "QUANTITIES",
    "RULES",
    "Quantities",
    "Rule",
    "baselines",
    "check_score_rule",
    "choices",
    "configured_rule",
    "excess_loss",
    "get_rule",
    "rule_label",
    "score_rules",
]
