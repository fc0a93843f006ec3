"""The quality gate: each quant against the configured thresholds (eval.gate), as sentences a user reads.

make_eval_report judges it and writes the verdict into metrics.json and the report; check_quality_gate
then fails the workflow on it, so a failing report is still on disk to be read."""

from __future__ import annotations

from cpuforge.evaluate.stages import REFERENCE


def quality_gate(records: list[dict], max_ppl_increase_pct: float, max_kl: float, min_accuracy: float) -> list[str]:
    """One sentence per quant and figure that misses its threshold."""
    failures = []
    for r in records:
        if r["kind"] != "gguf" or r["stage"] == REFERENCE:
            continue
        if r["ppl_increase_vs_f16_pct"] > max_ppl_increase_pct:
            failures.append(
                f"{r['stage']}: perplexity {r['perplexity']:.4g} is {r['ppl_increase_vs_f16_pct']:.1f}% above the f16 "
                f"GGUF's, more than eval.gate.max_ppl_increase_pct allows ({max_ppl_increase_pct:g}%)."
            )
        if r["kl_divergence"] > max_kl:
            failures.append(
                f"{r['stage']}: mean KL divergence from the f16 GGUF is {r['kl_divergence']:.4g}, more than "
                f"eval.gate.max_kl_divergence allows ({max_kl:g})."
            )
        if "accuracy" in r and r["accuracy"] < min_accuracy:
            failures.append(
                f"{r['stage']}: task accuracy is {r['accuracy']:.3f} ({r['correct']}/{r['rows']}), less than "
                f"eval.gate.min_accuracy requires ({min_accuracy:g})."
            )
    return failures


def judge(records: list[dict], thresholds: dict[str, float]) -> dict:
    """The gate's record in metrics.json: the thresholds, whether every quant met them, and the failures."""
    failures = quality_gate(records, thresholds["max_ppl_increase_pct"], thresholds["max_kl_divergence"],
                            thresholds["min_accuracy"])  # fmt: skip
    return {"thresholds": thresholds, "passed": not failures, "failures": failures}


def describe_thresholds(thresholds: dict[str, float]) -> str:
    """`max_ppl_increase_pct = 25, max_kl_divergence = 0.4, min_accuracy = 0.7`, as the report and the log say it."""
    return ", ".join(f"{k} = {v:g}" for k, v in thresholds.items())
