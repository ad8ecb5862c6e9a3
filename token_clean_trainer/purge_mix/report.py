"""`report.json` of a purge-mix run, assembled in one place from the records the stages return ([`stages`]).

Each section comes from the stage that did the work (`statistics`, `clusters`, `fusion`, ...); the run itself adds the
row counts, the LLM account, the cache counters, the timings and the config.
"""

from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np


def build_report(config, records: dict[str, dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    """
    The content of `report.json`.

    Args:
        config (`PurgeMixConfig`): The run's settings (written under `"config"`; the generator's backend and key
            variable name are read from it).
        records (`dict[str, dict]`): Each stage's record, by stage name, in the order the stages ran.
        run (`dict`): `input_rows`, `seed`, `generator` (the `CachedGenerator`, or `None` without LLM),
            `requests_at_start` (request cache entries when the run began) and `wall_time_s`.
    """
    split, rating, curated = records["split"], records["rating"], records["curation"]["curated"]
    reasons, raw, hq = split["reasons"], rating["raw"], split["hq"]
    generator = run["generator"]
    return {
        "input_rows": run["input_rows"],
        "rows_used": len(reasons),
        "drops_by_reason": dict(Counter(r[0] for r in reasons if r).most_common()),
        "filter_failures": dict(Counter(reason for r in reasons for reason in r).most_common()),
        "rater": rating["rater"],
        "scores": {
            "raw_histogram": _histogram(raw),
            "curated_histogram": _histogram(curated),
            "changed_by_curation": int((curated != raw).sum()),
            "hq_min_score": split["hq_min_score"],
        },
        "split": {"hq": int(hq.sum()), "lq": int((~hq).sum())},
        "statistics": stat_summary(records["statistics"]["stats"]),
        "clusters": records["clustering"]["summary"],
        "fusion": fusion_summary(records["fusion"]),
        "output": output_summary(records["write"]),
        "llm": generator.stats.to_dict() if generator is not None else None,
        "generator": generator_summary(config, generator),
        "embedding": records["embedding"]["embedding"],
        "cache": {
            "statistics_reused": records["statistics"]["reused"],
            "embeddings_reused": records["embedding"]["reused"],
            "request_cache_entries_at_start": run["requests_at_start"],
            "request_cache_entries_at_end": len(generator) if generator is not None else 0,
        },
        "timings": {key: value for record in records.values() for key, value in record.get("timings", {}).items()},
        "wall_time_s": run["wall_time_s"],
        "seed": run["seed"],
        "config": asdict(config),
    }


def _histogram(scores: np.ndarray) -> dict[str, int]:
    return {str(s): int((scores == s).sum()) for s in range(-1, 6)}


def stat_summary(stats: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """5th, 50th and 95th percentile of each statistic over the rows where it is finite."""
    out = {}
    for name, values in stats.items():
        finite = values[np.isfinite(values)]
        if len(finite):
            q = np.quantile(finite, [0.05, 0.5, 0.95])
            out[name] = {"p05": round(float(q[0]), 4), "p50": round(float(q[1]), 4), "p95": round(float(q[2]), 4)}
    return out


def fusion_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the fusion stage attempted and kept, why the rest was rejected, and how each operator fared."""
    results = record["results"]
    accepted = [r for r in results if r.accepted]
    rejection = Counter(d for r in results if not r.accepted for d in (r.defects[-1] if r.defects else []))
    by_operator: dict[str, dict[str, int]] = {}
    for r in results:
        entry = by_operator.setdefault(r.operators[0] if r.operators else "", {"attempted": 0, "accepted": 0})
        entry["attempted"] += 1
        entry["accepted"] += int(r.accepted)
    # Every attempt's defects by the operator that attempt used: which template fails how.
    defects_by_operator: dict[str, dict[str, int]] = {}
    for r in results:
        for op, found in zip(r.operators, r.defects):
            counts = defects_by_operator.setdefault(op, {})
            for code in found:
                counts[code] = counts.get(code, 0) + 1
    return {
        "attempted": len(results),
        "accepted": len(accepted),
        "rejected": len(results) - len(accepted),
        "acceptance_rate": round(len(accepted) / len(results), 4) if results else None,
        "cycles_of_accepted": dict(Counter(str(r.cycles) for r in accepted)),
        "by_operator": by_operator,
        "rejection_reasons": dict(rejection.most_common()),
        "attempt_defects_by_operator": defects_by_operator,
        "flagged_for_review": sum(1 for r in accepted if r.review_flags),
        "verification": verification_summary(results, record["verification"]),
        "checklist": record["checklist"],
        "max_repair_cycles": record["max_repair_cycles"],
    }


def verification_summary(results: list, counts: dict[str, int] | None) -> dict[str, Any]:
    """How the verifiers decided: final status counts, and per verifier the attempts (samples) it passed, failed or
    could not decide, over every sample that reached verification. `counts`: the verification cache's `computed`
    and `reused` verdict lists (None: nothing was verified)."""
    by_verifier: dict[str, dict[str, int]] = {}
    for r in results:
        for attempt in r.attempts:
            for v in attempt.get("verdicts", []):
                counts_of = by_verifier.setdefault(v["verifier"], {})
                counts_of[v["status"]] = counts_of.get(v["status"], 0) + 1
    status = Counter(r.status for r in results)
    return {
        "accepted": status.get("accepted", 0),
        "unverified": status.get("unverified", 0),
        "rejected": status.get("rejected", 0),
        "verified_by": dict(Counter(name for r in results if r.status == "accepted" for name in r.verified_by)),
        "samples_by_verifier": by_verifier,
        "verifications_computed": counts["computed"] if counts is not None else 0,
        "verifications_reused": counts["reused"] if counts is not None else 0,
    }


def output_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The output dataset: its mode, rows by origin, the mix ratio reached, and where it is."""
    origins = record["origins"]
    return {
        "mode": record["mode"],
        "hq_rows": origins.count("hq"),
        "synthesized_rows": origins.count("synthesized"),
        "total_rows": len(origins),
        **record["mix"],
        "dataset_path": record["dataset_path"],
    }


def generator_summary(config, generator) -> dict[str, Any] | None:
    """The generator's backend and identity (and, for the HTTP backend, the NAME of the key variable)."""
    if generator is None:
        return None
    name = getattr(generator.backend, "name", config.purge_mix_generator_backend)
    summary = {"backend": name, "identity": generator.backend.identity}
    if name == "openai":
        # The variable's name only: the key itself is never written anywhere.
        summary["api_key_env"] = config.purge_mix_api_key_env
    return summary
