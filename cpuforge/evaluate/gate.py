"""The quality gate (eval.gate): whether a quant answers like the fine-tune, with the confidence its rows allow.

A quant passes when, at `confidence` (one-sided), its disagreement with the f16 GGUF's answers on the held-out
rows is bounded within `max_disagreement`, the rows do not show it less accurate than the f16 GGUF by more than
`max_accuracy_drop` (exact McNemar on the flips: cpuforge.evaluate.fidelity), its mean KL divergence from the
f16 GGUF is within `max_kl_divergence` counting llama-perplexity's standard error, and its perplexity within
`max_ppl_increase_pct`; `min_accuracy`, an absolute floor on the task's exact match, is off unless set.

make_eval_report judges every stage and writes the verdict into metrics.json and the report; check_quality_gate
then fails the workflow on it, so a failing report is still on disk to be read. The quant search judges its
candidates by the same Gate."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from statistics import NormalDist

from cpuforge.errors import InputError
from cpuforge.evaluate.stages import REFERENCE


@dataclass(frozen=True)
class Gate:
    confidence: float = 0.95
    max_disagreement: float = 0.2
    max_accuracy_drop: float = 0.0
    max_kl_divergence: float = 0.4
    max_ppl_increase_pct: float = 25.0
    min_accuracy: float | None = None

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if key == "min_accuracy" and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise InputError(f"eval.gate.{key}: {value!r} is not a number.")
            low, high = RANGES[key]
            if not low <= value <= high or (key in OPEN and value in (low, high)):
                raise InputError(f"eval.gate.{key}: {value!r} is outside {range_words(key)}.")

    @classmethod
    def parse(cls, pairs: list[str]) -> Gate:
        """From `KEY=VALUE` words (the scripts' --gate); `min_accuracy=none` turns the floor off."""
        known = {f.name for f in fields(cls)}
        values: dict = {}
        for pair in pairs:
            key, sep, text = pair.partition("=")
            if not sep or key not in known:
                raise InputError(f"--gate {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}.")
            try:
                values[key] = None if text.lower() in ("none", "null") else float(text)
            except ValueError:
                raise InputError(f"eval.gate.{key}: {text!r} is not a number.") from None
        return cls(**values)

    def words(self) -> list[str]:
        """The --gate words that parse back to this gate."""
        return [f"{k}={'none' if v is None else v}" for k, v in asdict(self).items()]

    def kl_bound(self, figures: dict) -> float:
        """The KL divergence's one-sided upper bound: the mean plus its standard error's quantile."""
        return figures["kl_divergence"] + NormalDist().inv_cdf(self.confidence) * figures.get("kl_divergence_err", 0)

    def misses(self, figures: dict) -> list[str]:
        """The limits that `figures` miss, each as a phrase naming its key; empty when it passes. `figures`:
        kl_divergence (and its _err), ppl_increase_pct, and with a task `fidelity` (cpuforge.evaluate.fidelity
        .compare) and `accuracy`."""
        out, pct = [], f"{self.confidence * 100:g} %"
        kl = self.kl_bound(figures)
        if kl > self.max_kl_divergence:
            out.append(f"KL divergence from the f16 GGUF {figures['kl_divergence']:.4g} ± "
                       f"{figures.get('kl_divergence_err', 0):.2g} (at {pct} up to {kl:.4g}) > eval.gate."
                       f"max_kl_divergence {self.max_kl_divergence:g}")  # fmt: skip
        if figures["ppl_increase_pct"] > self.max_ppl_increase_pct:
            out.append(f"perplexity +{figures['ppl_increase_pct']:.1f} % over the f16 GGUF's > eval.gate."
                       f"max_ppl_increase_pct {self.max_ppl_increase_pct:g} %")  # fmt: skip
        f = figures.get("fidelity")
        if f is not None:
            if f["disagreement_bound"] > self.max_disagreement:
                out.append(f"answers unlike the f16 GGUF's on {f['rows'] - f['agree']}/{f['rows']} rows (at {pct} "
                           f"up to {f['disagreement_bound'] * 100:.1f} %) > eval.gate.max_disagreement "
                           f"{self.max_disagreement:g}")  # fmt: skip
            if f["shown_accuracy_drop"] > self.max_accuracy_drop:
                out.append(f"{f['worse']} right->wrong against {f['better']} wrong->right flips (an accuracy drop "
                           f"at {pct} of at least {f['shown_accuracy_drop'] * 100:.1f} %) > eval.gate."
                           f"max_accuracy_drop {self.max_accuracy_drop:g}")  # fmt: skip
        if self.min_accuracy is not None and figures.get("accuracy") is not None and figures["accuracy"] < self.min_accuracy:
            out.append(f"task accuracy {figures['accuracy']:.3f} < eval.gate.min_accuracy {self.min_accuracy:g}")
        return out

    def describe(self) -> str:
        """`confidence = 0.95, max_disagreement = 0.2, …`, as the report and the log say it."""
        return ", ".join(f"{k} = {'off' if v is None else f'{v:g}'}" for k, v in asdict(self).items())


RANGES = {"confidence": (0.5, 1.0), "max_disagreement": (0.0, 1.0), "max_accuracy_drop": (0.0, 1.0),
          "max_kl_divergence": (0.0, float("inf")), "max_ppl_increase_pct": (0.0, float("inf")),
          "min_accuracy": (0.0, 1.0)}  # fmt: skip
OPEN = ("confidence",)  # its range's ends themselves are refused: 0.5 and 1 bound nothing


def range_words(key: str) -> str:
    """A limit's range as the refusal says it: `(0.5, 1)`, `[0, 1]`, `[0, inf)`."""
    low, high = RANGES[key]
    return f"{'(' if key in OPEN else '['}{low:g}, {high:g}{')' if key in OPEN or high == float('inf') else ']'}"


def stage_figures(record: dict) -> dict:
    """A report stage's record as the figures Gate.misses reads."""
    return {**record, "ppl_increase_pct": record["ppl_increase_vs_f16_pct"]}


def quality_gate(records: list[dict], gate: Gate) -> list[str]:
    """One sentence per quant that misses the gate, naming every limit it misses."""
    return [f"{r['stage']}: {'; '.join(misses)}." for r in records
            if r["kind"] == "gguf" and r["stage"] != REFERENCE and (misses := gate.misses(stage_figures(r)))]  # fmt: skip


def judge(records: list[dict], gate: Gate) -> dict:
    """The gate's record in metrics.json: the thresholds, whether every quant met them, and the failures."""
    failures = quality_gate(records, gate)
    return {"thresholds": asdict(gate), "passed": not failures, "failures": failures}
