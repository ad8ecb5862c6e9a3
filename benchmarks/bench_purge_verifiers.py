"""Benchmark (not a test): every purge-mix verifier and judge scored on the labelled gold set.

    python benchmarks/bench_purge_verifiers.py --out benchmarks/results/purge_verifiers_gold.json

The gold set (`tests/data/purge_mix_gold.jsonl`) holds every fusion attempt of a real run, each labelled `sound` or
`unsound` by a person with a one-line reason. Treating "passed" as "keep this row", for each check on the rows it
applies to: precision (sound among the kept), recall (kept among the sound), and the unsound rows it stops. Then the
whole acceptance rule, old (code checks + the LLM checklist, as the run decided) against new (code checks, the
deterministic verifiers, the judge where none applies), and per verifier the rows the old rule accepted that it
stops. The grounding support and the judge's P(yes) are swept over thresholds; the chosen ones are the lowest
thresholds whose precision is at least `--target_precision` (else the best F0.5). Judge requests go through the
request cache under `--cache`, so a rerun costs nothing; with `--judge_cache_only` the model is not even loaded, and a
request the cache lacks is an error.

The provenance verifier's rules are ablated (none, each alone, all but one, all) on the pairs the rule without it
accepts, and on a held-out labelled run (`--heldout`: the accepted pairs of an evidence run, labelled one by one),
whose candidates are also scored without the ones the gold set already holds. A few acceptance policies that were
measured and not adopted are scored there too (`alternative_policies`).
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GOLD = os.path.join(HERE, "..", "tests", "data", "purge_mix_gold.jsonl")
HELDOUT = os.path.join(HERE, "results", "purge_mix_qwen_coder_accepted_labelled.jsonl")


def provenance_ablation(rows: list[dict], accepted: list[bool], sound: list[bool]) -> list[dict]:
    """Precision of the pairs `accepted` still keeps under each subset of the provenance rules: none, each alone,
    all but one, all."""
    from token_clean_trainer.purge_mix.verify.provenance import RULES, provenance_defects

    failed = [
        {rule for rule, _ in provenance_defects(row["candidate"], row["sources"])} if ok else set()
        for row, ok in zip(rows, accepted)
    ]
    subsets = [()] + [(r,) for r in RULES] + [tuple(x for x in RULES if x != r) for r in RULES] + [RULES]
    out = []
    for subset in subsets:
        kept = [ok and not (f & set(subset)) for ok, f in zip(accepted, failed)]
        name = "+".join(subset) if subset else "(none)"
        if len(subset) == len(RULES) - 1:
            name = f"all but {next(r for r in RULES if r not in subset)}"
        out.append({"rules": "all" if subset == RULES else name, **scores(kept, sound)})
    return out


def _terms(text: str) -> set[str]:
    from token_clean_trainer.purge_mix.checks import term_forms

    return {norm for norm, _ in term_forms(text)}


def alternative_policies(rows: list[dict], accepted: list[bool], sound: list[bool], verified: list[list[str]]):
    """Policies measured and not adopted, each on the pairs `accepted` keeps (with the provenance rules applied)."""
    import re

    from token_clean_trainer.purge_mix.checks import term_found
    from token_clean_trainer.purge_mix.verify.provenance import provenance_defects

    base = [ok and not provenance_defects(row["candidate"], row["sources"]) for row, ok in zip(rows, accepted)]

    def one_question(row):  # a single question or task, not two glued together
        instruction = row["candidate"]["instruction"]
        glued = re.search(r",?\s+and\s+(?:what|which|who|where|when|how|in (?:what|which))\b", instruction, re.I)
        return instruction.count("?") <= 1 and not re.search(r"^\s*2[.)]", instruction, re.M) and not glued

    def faithful_questions(row):  # every source question it restates keeps all its words
        asked = _terms(row["candidate"]["instruction"])
        for src in row["sources"]:
            words = _terms(src["instruction"])
            found = {w for w in words if term_found(w, asked)}
            if found and found != words:
                return False
        return True

    policies = {
        "checkable only (code or arithmetic passed)": lambda i: any(
            v.startswith(("code", "arithmetic")) for v in verified[i]
        ),
        "one question per instruction": lambda i: one_question(rows[i]),
        "source questions restated in full": lambda i: faithful_questions(rows[i]),
    }
    return {
        "with provenance": scores(base, sound),
        **{name: scores([b and rule(i) for i, b in enumerate(base)], sound) for name, rule in policies.items()},
    }


def heldout_report(path: str) -> dict:
    """The provenance ablation and the alternative policies on a labelled run's accepted pairs, all of them and the
    ones whose candidate the gold set does not hold."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    gold = {json.dumps(row["candidate"], sort_keys=True) for row in load_gold() if row["candidate"]}
    unseen = [json.dumps(row["candidate"], sort_keys=True) not in gold for row in rows]
    sound = [row["label"] == "sound" for row in rows]
    verified = [row.get("verified_by", []) for row in rows]
    return {
        "rows": len(rows),
        "sound": sum(sound),
        "also_in_gold": len(rows) - sum(unseen),
        "provenance_ablation": provenance_ablation(rows, [True] * len(rows), sound),
        "provenance_ablation_unseen": provenance_ablation(rows, unseen, sound),
        "alternative_policies": alternative_policies(rows, [True] * len(rows), sound, verified),
    }


def load_gold(path: str = GOLD) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        if row.get("label") not in ("sound", "unsound"):
            raise ValueError(f"gold row {row.get('id')}: label must be 'sound' or 'unsound', got {row.get('label')!r}")
    return rows


def scores(kept: list[bool], sound: list[bool]) -> dict:
    tp = sum(k and s for k, s in zip(kept, sound))
    fp = sum(k and not s for k, s in zip(kept, sound))
    fn = sum(s and not k for k, s in zip(kept, sound))
    tn = sum(not k and not s for k, s in zip(kept, sound))
    return {
        "rows": len(kept),
        "kept": tp + fp,
        "precision": round(tp / (tp + fp), 3) if tp + fp else None,
        "recall": round(tp / (tp + fn), 3) if tp + fn else None,
        "unsound_stopped": tn,
        "unsound_let_through": fp,
        "sound_stopped": fn,
    }


def roc_auc(scores_: list[float], sound: list[bool]) -> float | None:
    """The chance that a sound row scores above an unsound one (ties count half): 0.5 is no signal."""
    pos = [x for x, s in zip(scores_, sound) if s]
    neg = [x for x, s in zip(scores_, sound) if not s]
    if not pos or not neg:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return round(wins / (len(pos) * len(neg)), 3)


def choose(sweep: list[dict], target: float, min_recall: float = 0.5) -> dict | None:
    """The lowest threshold reaching `target` precision while keeping at least `min_recall` of the sound rows, else
    the best F0.5 (precision weighs twice recall)."""
    ok = [
        s
        for s in sweep
        if s["precision"] is not None and s["precision"] >= target and (s["recall"] or 0) >= min_recall
    ]
    if ok:
        return min(ok, key=lambda s: s["threshold"])

    def f05(s):
        p, r = s["precision"] or 0.0, s["recall"] or 0.0
        return 1.25 * p * r / (0.25 * p + r) if p + r else 0.0

    return max(sweep, key=f05) if sweep else None


def form_findings(rows: list[dict]) -> list[list[str]]:
    """The loop's deterministic form checks on every row (the pool's common words from the gold set's sources)."""
    from token_clean_trainer.purge_mix.checks import check_candidate, common_terms
    from token_clean_trainer.purge_mix.config import PurgeMixConfig

    config = PurgeMixConfig()
    pool = [s for row in rows for s in row["sources"]]
    common = common_terms(pool)
    out = []
    for row in rows:
        operator = row["operator"] if len(row["sources"]) > 1 else None
        out.append([code for code, _ in check_candidate(row["candidate"], row["sources"], config, operator, common)])
    return out


def deterministic(rows: list[dict], settings) -> list[list]:
    from token_clean_trainer.purge_mix.verify.verifiers import deterministic_verdicts

    out = []
    for row in rows:
        out.append(deterministic_verdicts(row["candidate"], row["sources"], settings) if row["candidate"] else [])
    return out


class _NoModel:
    """Stands in for the llama.cpp model when only cached judge replies may be used."""

    def __getattr__(self, name):
        raise RuntimeError("--judge_cache_only: a judge request is not in the cache")


def judge_scores(rows: list[dict], cache: str, threads: int, cache_only: bool = False) -> list[float | None]:
    from token_clean_trainer.assets import embedded_gguf_path
    from token_clean_trainer.purge_mix.generators import CachedGenerator, LlamaCppGenerator
    from token_clean_trainer.purge_mix.verify.judge import judge_messages, judge_score

    path = embedded_gguf_path("embedded:qwen2.5-coder-1.5b")
    engine = LlamaCppGenerator(path, n_threads=threads, llama=_NoModel() if cache_only else None)
    generator = CachedGenerator(engine, cache, max_tokens=1, temperature=0.0)
    todo = [i for i, row in enumerate(rows) if row["candidate"]]
    start = time.perf_counter()
    replies = generator.generate(
        [judge_messages(rows[i]["candidate"]) for i in todo], stage="judge", answer_probs=True
    )
    seconds = time.perf_counter() - start
    out: list[float | None] = [None] * len(rows)
    for i, reply in zip(todo, replies):
        out[i] = judge_score(reply.text)[0]
    print(f"judge: {len(todo)} rows in {seconds:.1f} s ({generator.stats.calls} computed)", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gold", default=GOLD)
    parser.add_argument("--cache", default="outputs/bench_purge_verifiers/cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no_judge", action="store_true")
    parser.add_argument("--judge_cache_only", action="store_true", help="replay cached judge replies, load no model")
    parser.add_argument("--heldout", default=HELDOUT, help="a labelled run's accepted pairs ('' to skip)")
    parser.add_argument("--target_precision", type=float, default=0.9)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from token_clean_trainer.purge_mix.verify.base import FAILED, PASSED
    from token_clean_trainer.purge_mix.verify.verifiers import VerifierSettings, decision

    rows = load_gold(args.gold)
    sound = [row["label"] == "sound" for row in rows]
    parsed = [row["candidate"] is not None for row in rows]
    form = form_findings(rows)
    form_ok = [p and not f for p, f in zip(parsed, form)]
    result: dict = {"rows": len(rows), "sound": sum(sound), "unsound": len(rows) - sum(sound), "checks": {}}
    result["checks"]["form (code checks)"] = scores(form_ok, sound)

    # Each deterministic verifier alone, on the rows it applies to (grounding at its default threshold).
    base = VerifierSettings()
    verdicts = deterministic(rows, base)
    families = sorted({v.verifier.split(":")[0] for vs in verdicts for v in vs})
    for family in families:
        index = [i for i, vs in enumerate(verdicts) if any(v.verifier.split(":")[0] == family for v in vs)]
        kept = [all(v.status == PASSED for v in verdicts[i] if v.verifier.split(":")[0] == family) for i in index]
        result["checks"][family] = scores(kept, [sound[i] for i in index])

    # Grounding threshold sweep.
    sweep = []
    grounded = [i for i, vs in enumerate(verdicts) if any(v.verifier == "grounding" for v in vs)]
    for t in [round(0.05 * k, 2) for k in range(4, 20)]:
        settings = VerifierSettings(code=False, arithmetic=False, provenance=False, grounding_min_support=t)
        kept = [decision(deterministic([rows[i]], settings)[0]) == PASSED for i in grounded]
        sweep.append({"threshold": t, **scores(kept, [sound[i] for i in grounded])})
    result["grounding_sweep"] = sweep
    chosen_grounding = choose(sweep, args.target_precision)
    result["grounding_threshold"] = chosen_grounding

    # The judge, on every parsed row and on the rows no deterministic verifier applies to.
    if args.no_judge:
        p_yes = [None] * len(rows)
    else:
        p_yes = judge_scores(rows, args.cache, args.threads, cache_only=args.judge_cache_only)
    if not args.no_judge:
        judged = [i for i in range(len(rows)) if p_yes[i] is not None]
        jsweep = [
            {"threshold": t, **scores([p_yes[i] >= t for i in judged], [sound[i] for i in judged])}
            for t in [round(0.05 * k, 2) for k in range(1, 20)]
        ]
        result["judge_sweep_all_rows"] = jsweep
        result["judge_roc_auc"] = roc_auc([p_yes[i] for i in judged], [sound[i] for i in judged])
        fallback = [i for i in judged if not verdicts[i]]
        result["judge_sweep_where_no_verifier_applies"] = [
            {"threshold": t, **scores([p_yes[i] >= t for i in fallback], [sound[i] for i in fallback])}
            for t in [round(0.05 * k, 2) for k in range(1, 20)]
        ]
        result["judge_threshold"] = choose(jsweep, args.target_precision)

    # The old rule (as the run decided: code checks + the LLM checklist) against the new rule.
    # The old rule (code checks + the LLM checklist) as the runs that applied it decided.
    old_rows = [i for i, row in enumerate(rows) if row.get("run_rule", "checklist") == "checklist"]
    old_kept = [rows[i]["run_accepted"] if i in old_rows else False for i in range(len(rows))]
    result["old_rule"] = {
        **scores([old_kept[i] for i in old_rows], [sound[i] for i in old_rows]),
        "run_rows": len(old_rows),
    }
    g = chosen_grounding["threshold"] if chosen_grounding else base.grounding_min_support
    jt = result.get("judge_threshold", {}) or {}
    settings = VerifierSettings(grounding_min_support=g, judge_threshold=jt.get("threshold", base.judge_threshold))
    final = deterministic(rows, settings)
    without_provenance = deterministic(rows, VerifierSettings(**{**settings.__dict__, "provenance": False}))

    def rule(judge_everything: bool, verdicts_=final) -> tuple[list[bool], list[str]]:
        kept, status = [], []
        for i in range(len(rows)):
            if not form_ok[i]:
                kept.append(False)
                status.append("form")
                continue
            vs = verdicts_[i]
            st = decision(vs) if vs else "unverified"
            if (not vs or (judge_everything and st == PASSED)) and p_yes[i] is not None:
                st = PASSED if p_yes[i] >= settings.judge_threshold else FAILED
            kept.append(st == PASSED)
            status.append(st)
        return kept, status

    new_kept, status = rule(judge_everything=False)
    result["new_rule"] = {**scores(new_kept, sound), "settings": settings.__dict__}
    before, _ = rule(judge_everything=False, verdicts_=without_provenance)
    result["new_rule_without_provenance"] = scores(before, sound)
    result["provenance_ablation"] = provenance_ablation(rows, before, sound)
    gold_verified = [[v.verifier for v in vs if v.status == PASSED] for vs in without_provenance]
    result["alternative_policies"] = alternative_policies(rows, before, sound, gold_verified)
    if args.heldout:
        result["heldout"] = heldout_report(args.heldout)
    if not args.no_judge:
        # The judge also on pairs the deterministic verifiers passed (`purge_mix_judge_scope: all`).
        result["new_rule_judge_on_all"] = scores(rule(judge_everything=True)[0], sound)
        passed_det = [i for i in range(len(rows)) if form_ok[i] and final[i] and decision(final[i]) == PASSED]
        result["judge_sweep_after_verifiers"] = [
            {"threshold": t, **scores([p_yes[i] >= t for i in passed_det], [sound[i] for i in passed_det])}
            for t in [round(0.05 * k, 2) for k in range(1, 20)]
        ]
    stopped = {}
    for i in range(len(rows)):
        if old_kept[i]:
            for v in final[i]:
                if v.status != PASSED:
                    stopped.setdefault(v.verifier.split(":")[0], []).append(rows[i]["id"])
            if not form_ok[i]:
                stopped.setdefault("form", []).append(rows[i]["id"])
            if not final[i] and p_yes[i] is not None and p_yes[i] < settings.judge_threshold:
                stopped.setdefault("judge", []).append(rows[i]["id"])
    result["old_accepted_stopped_by"] = {
        k: {"rows": v, "unsound": sum(not sound[[r["id"] for r in rows].index(x)] for x in v)}
        for k, v in stopped.items()
    }
    result["per_row"] = [
        {
            "id": row["id"],
            "label": row["label"],
            "form": form[i],
            "verdicts": [f"{v.verifier}:{v.status}" for v in final[i]],
            "p_yes": None if p_yes[i] is None else round(p_yes[i], 3),
            "old_kept": old_kept[i],
            "new_kept": new_kept[i],
        }
        for i, row in enumerate(rows)
    ]
    summary = {k: v for k, v in result.items() if k != "per_row"}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
