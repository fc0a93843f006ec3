"""The quant search (cpuforge.autoquant): its arithmetic, ggml's rounding as llama-quantize writes it, the
recipe's round trip through llama-quantize, and the search through Snakemake on a tiny model."""

from __future__ import annotations

import itertools
import re
import subprocess

import numpy as np
import pytest
from helpers.llama import convert
from helpers.models import make_tiny_llama

from cpuforge.autoquant import recipe
from cpuforge.autoquant.frontier import hull, sweep
from cpuforge.autoquant.search import (
    CLEAR,
    EDGE_STEP,
    KL_MARGIN,
    MIN_SPREAD,
    MIN_WINDOWS,
    PRIOR,
    KlLaw,
    chosen,
    decided_early,
    first_probe,
    kl_law,
    next_probe,
    search,
)
from cpuforge.autoquant.screen import cut_layers, n_layers, write_screen
from cpuforge.autoquant.sensitivity import MIN_ROWS, Option, measure, relative_error, rows_for, sample_rows
from cpuforge.autoquant.tensors import Tensors
from cpuforge.errors import InputError
from cpuforge.evaluate.gate import Gate
from cpuforge.evaluate.perplexity import kl_divergence, perplexity_gguf, running_kl, spread_logits, spread_order
from cpuforge.evaluate.bench import bench_side_by_side
from cpuforge.io.gguf import open_gguf, read_header, read_metadata
from cpuforge.llama.ggml import ggml_type, round_trip, type_name
from cpuforge.llama.quant import planned_types, run_quantize

# rows of 256, so the K- and I-types fit every matrix as they are
K_SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=2)


def random_table(seed: int, tensors: int = 4) -> dict[str, list[Option]]:
    """Tensors with a few types each: errors that fall as bytes rise, with noise, so some types are dominated
    and some lie off the convex hull."""
    rng = np.random.default_rng(seed)
    table = {}
    for t in range(tensors):
        scale = rng.uniform(0.1, 10)
        sizes = sorted(rng.choice(np.arange(10, 100), size=4, replace=False))
        table[f"blk.{t}.w"] = [Option(f"t{s}", int(s) * 1000, float(scale * 2.0 ** (-s / 10) * rng.uniform(0.7, 1.3)))
                               for s in sizes]  # fmt: skip
    return table


@pytest.mark.unit
def test_hull_keeps_only_types_some_budget_prefers():
    a, b, c, d = Option("a", 100, 0.0), Option("b", 80, 0.5), Option("c", 60, 0.6), Option("d", 90, 0.7)
    # d is larger and lossier than b; b lies above the line from a to c (0.5 > 0.3), so a budget never stops there
    assert hull([a, b, c, d]) == [a, c]
    assert hull([a, Option("b", 80, 0.2), c]) == [a, Option("b", 80, 0.2), c]


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(5))
def test_every_point_of_the_frontier_is_the_least_lossy_mix_of_its_size(seed):
    """Brute force over every mix of a small table: no mix of at most a point's bytes loses less."""
    table = random_table(seed)
    frontier = sweep(table)
    mixes = [dict(zip(table, combo)) for combo in itertools.product(*table.values())]
    for k in range(len(frontier)):
        mix = frontier.mix(k)
        assert frontier.bytes(k) == sum(o.bytes for o in mix.values())
        assert frontier.loss(k) == pytest.approx(sum(o.error for o in mix.values()))
        best = min(sum(o.error for o in m.values()) for m in mixes if sum(o.bytes for o in m.values()) <= frontier.bytes(k))
        assert frontier.loss(k) <= best + 1e-12
    assert all(frontier.bytes(k) > frontier.bytes(k + 1) for k in range(len(frontier) - 1))
    assert all(frontier.loss(k) <= frontier.loss(k + 1) for k in range(len(frontier) - 1))
    assert sweep(table) == frontier  # the same table, the same frontier


def synthetic(frontier, factor: float, accuracy_from: int | None = None, exponent: float = 1.0):
    """Measurements whose KL divergence is `factor` x the point's loss ** `exponent`, and whose task accuracy
    drops at `accuracy_from` and beyond; they record which points were measured, and which had their task run."""
    seen, tasks = [], []

    def measure(k):
        seen.append(k)
        return {"kl_divergence": factor * frontier.loss(k) ** exponent, "ppl_increase_pct": 0.0}

    def measure_task(k, figures):
        assert figures["kl_divergence"] == factor * frontier.loss(k) ** exponent  # the point's own figures
        tasks.append(k)
        return {"accuracy": 0.0 if accuracy_from is not None and k >= accuracy_from else 1.0}

    return measure, measure_task, seen, tasks


@pytest.mark.unit
def test_a_size_limit_takes_the_least_lossy_mix_within_it():
    """auto_quant.max_size_mib / max_bpw: the first point (the least lossy) of at most the limit's bytes."""
    frontier = sweep(random_table(5, tensors=6))
    sizes = [frontier.bytes(k) for k in range(len(frontier))]
    limit = (sizes[3] + sizes[4]) // 2
    assert frontier.largest_within(limit) == 4 and frontier.largest_within(sizes[0]) == 0
    assert frontier.largest_within(sizes[-1] - 1) is None


@pytest.mark.unit
def test_the_search_finds_the_smallest_passing_point():
    frontier = sweep(random_table(7, tensors=8))
    gate = Gate(max_kl_divergence=0.5, max_ppl_increase_pct=25, min_accuracy=0.5)
    measure, measure_task, seen, tasks = synthetic(frontier, factor=0.3)
    passing = [k for k in range(len(frontier)) if 0.3 * frontier.loss(k) <= 0.5]
    results = search(frontier, measure, measure_task, gate, first=len(frontier) // 2, budget=len(frontier), task=True)
    assert chosen(results) == max(passing) and "accuracy" in results[max(passing)]
    # the KL divergence is predicted from the first measurement on: far fewer probes than points; the task,
    # the dearest measurement, runs once, on the point chosen
    assert len(seen) <= 6 < len(frontier) and tasks == [max(passing)]
    # accuracy, which the loss does not predict, bounds the choice where it drops first: the search goes on
    # above the point whose task missed
    measure, measure_task, seen, tasks = synthetic(frontier, factor=0.3, accuracy_from=3)
    results = search(frontier, measure, measure_task, gate, first=len(frontier) // 2, budget=len(frontier), task=True)
    assert chosen(results) == min(2, max(passing)) and results[chosen(results)]["accuracy"] == 1.0
    assert all(not results[k]["passed"] and "task accuracy" in results[k]["misses"][0] for k in tasks[:-1])


@pytest.mark.unit
def test_a_limit_predicted_at_the_smallest_passing_point_is_probed_a_short_step_past_it():
    """Not the middle of the bracket, far down the frontier where every tensor changes type (at the 1B shape
    such a jump cost 3 minutes of quantizing for a candidate sure to fail): 3 % of the bytes below."""
    frontier = sweep(random_table(7, tensors=12))
    gate = Gate(max_kl_divergence=0.5, max_ppl_increase_pct=25, min_accuracy=None)
    first = len(frontier) // 4
    at_margin = {first: {"kl_divergence": 0.99 * KL_MARGIN * 0.5, "passed": True, "order": 0}}
    k = next_probe(frontier, at_margin, gate, first)
    target = frontier.bytes(first) * (1 - EDGE_STEP)
    assert first < k < len(frontier) // 2
    nearest = min(abs(frontier.bytes(j) - target) for j in range(first + 1, len(frontier)))
    assert abs(frontier.bytes(k) - target) == nearest
    # with room below the margin, the prediction itself: one point, the prior's exponent through it
    below = {first: {"kl_divergence": 0.5 * KL_MARGIN * 0.5, "passed": True, "order": 0}}
    losses = [frontier.loss(j) for j in range(len(frontier))]
    predicted = max(j for j in range(len(frontier)) if losses[j] <= 0.5 ** (-1 / PRIOR.exponent) * losses[first])
    assert first + 1 < predicted < len(frontier) - 1
    assert next_probe(frontier, below, gate, first) == predicted


@pytest.mark.unit
def test_the_first_probe_is_predicted_by_the_prior_and_a_pass_within_the_margin_ends_the_search():
    """The first candidate where the prior law puts the gate's margin (not a fixed size every model passes with
    room to spare); a passing point within the margin leaves no room predicted below it, so the task runs on
    it at once."""
    frontier = sweep(random_table(7, tensors=12))
    losses = [frontier.loss(k) for k in range(len(frontier))]
    k = len(frontier) // 3
    limit = PRIOR.scale * losses[k] ** PRIOR.exponent / KL_MARGIN
    gate = Gate(max_kl_divergence=limit, max_ppl_increase_pct=25, min_accuracy=0.5)
    assert first_probe(frontier, gate) == max(j for j in range(len(frontier)) if losses[j] <= losses[k])
    assert first_probe(frontier, Gate(max_kl_divergence=1e-12)) == 0
    assert first_probe(frontier, Gate(max_kl_divergence=1e12)) == len(frontier) - 1
    # the model a little more sensitive than the prior says: the first probe passes within the margin, and its
    # task decides
    measure, measure_task, seen, tasks = synthetic(frontier, factor=1.05 * PRIOR.scale, exponent=PRIOR.exponent)
    results = search(frontier, measure, measure_task, gate, first_probe(frontier, gate), budget=3, task=True)
    assert seen == tasks == [first_probe(frontier, gate)] and chosen(results) == seen[0]
    # a model half as sensitive: the first probe passes with room below it, and the search goes on down
    measure, measure_task, seen, tasks = synthetic(frontier, factor=PRIOR.scale / 2, exponent=PRIOR.exponent)
    results = search(frontier, measure, measure_task, gate, first_probe(frontier, gate), budget=3, task=True)
    assert len(seen) > 1 and chosen(results) > seen[0]


@pytest.mark.unit
def test_the_kl_law_is_fitted_in_log_log_where_the_losses_are_apart():
    frontier = sweep(random_table(7, tensors=12))
    far, near = 1, len(frontier) - 2
    assert frontier.loss(near) > MIN_SPREAD * frontier.loss(far)

    def measured(*points, law=KlLaw(0.9, 0.45)):
        return {k: {"kl_divergence": law.scale * frontier.loss(k) ** law.exponent} for k in points}

    law = kl_law(frontier, measured(far, near))
    assert law.scale == pytest.approx(0.9) and law.exponent == pytest.approx(0.45)
    assert kl_law(frontier, {}) == PRIOR
    # losses too close to read a slope from (their noise would decide it): the prior's exponent, scaled through
    close = next(k for k in range(far + 1, len(frontier)) if frontier.loss(k) > frontier.loss(far))
    assert frontier.loss(close) < MIN_SPREAD * frontier.loss(far)
    assert kl_law(frontier, measured(far, close)).exponent == PRIOR.exponent
    # a slope beyond what a frontier shows is held at the bounds
    assert kl_law(frontier, measured(far, near, law=KlLaw(0.1, 4.0))).exponent == 1.5


@pytest.mark.unit
def test_a_model_three_times_as_sensitive_as_the_prior_is_reached_within_the_budget():
    """As at the 7B shape: the first probe fails by far; the next, from the prior's exponent through it,
    lands where the model's own law puts the margin (a factor proportional to the loss undershot every step up
    there), and the last is a short step past it, as the limit is predicted there."""
    frontier = sweep(random_table(7, tensors=12))
    losses = [frontier.loss(k) for k in range(len(frontier))]
    truth = KlLaw(3 * PRIOR.scale, 0.5)
    gate = Gate(max_kl_divergence=truth.scale * losses[len(frontier) // 5] ** 0.5, max_ppl_increase_pct=25,
                min_accuracy=None)  # fmt: skip
    measure, measure_task, seen, tasks = synthetic(frontier, factor=truth.scale, exponent=truth.exponent)
    results = search(frontier, measure, measure_task, gate, first_probe(frontier, gate), budget=3, task=False)
    assert not results[seen[0]]["passed"] and len(seen) == 3
    assert seen[1] == predicted_by(frontier, truth, KL_MARGIN * gate.max_kl_divergence)
    assert chosen(results) == max(k for k in seen if results[k]["passed"]) >= seen[1]


def predicted_by(frontier, law: KlLaw, kl: float) -> int:
    return max(k for k in range(len(frontier)) if law.scale * frontier.loss(k) ** law.exponent <= kl)


@pytest.mark.unit
def test_a_kl_run_is_decided_early_on_llama_perplexity_s_running_row():
    """A row of llama-perplexity's KL table (the 7B shape's first candidate, its fourth window): the figures
    over the windows so far, and the verdict that its run need not go on, either way."""
    row = "   4    70200.5086 ± 2818.7928       0.07100 ±    0.04463       1.09794 ±    0.00194     0.007 ±  0.001 %" \
          "     0.196 ±  0.139 %\n"  # fmt: skip
    figures = running_kl(row, ctx=512)
    assert figures["windows"] == 4 and figures["scored_tokens"] == 4 * 255
    assert figures["kl_divergence"] == 1.09794 and figures["top1_agreement"] == pytest.approx(0.00196)
    assert figures["f16_perplexity"] == pytest.approx(70200.5086 / np.exp(0.07100))
    assert running_kl("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence\n", 512) is None
    gate = Gate(max_kl_divergence=0.4, max_ppl_increase_pct=25, min_accuracy=None)
    assert decided_early(gate, figures) == "a clear miss"
    assert decided_early(gate, {**figures, "windows": MIN_WINDOWS - 1}) is None  # too few windows to judge
    assert decided_early(gate, {**figures, "kl_divergence": CLEAR * 0.4}) is None  # a miss, not a clear one
    # a clear pass: the bound (mean + 1.645 x its error) and the perplexity's +7.4 % within the limits / CLEAR
    passing = {**figures, "kl_divergence": 0.3, "kl_divergence_err": 0.01}
    assert decided_early(gate, passing) == "a clear pass"
    assert decided_early(gate, {**passing, "kl_divergence_err": 0.02}) is None  # its bound 0.333 > 0.4 / CLEAR
    # the perplexity alone: +7.4 % is neither a clear pass at a limit of 9 % nor a clear miss at 6 %, a clear miss
    # at 5 %
    assert decided_early(Gate(max_ppl_increase_pct=9, min_accuracy=None), passing) is None
    assert decided_early(Gate(max_ppl_increase_pct=6, min_accuracy=None), passing) is None
    assert decided_early(Gate(max_ppl_increase_pct=5, min_accuracy=None), passing) == "a clear miss"


@pytest.mark.unit
def test_windows_are_spread_so_every_first_few_stand_for_the_whole_text():
    assert spread_order(16) == [0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15]
    for n in range(1, 70):
        order = spread_order(n)
        assert sorted(order) == list(range(n))
        for k in (2, 4, 8):  # the first k windows: n / k apart, whole windows
            first = sorted(order[:k])
            gaps = [b - a for a, b in zip(first, first[1:])] + [n - first[-1] + first[0]]
            assert n < k or all(n // k <= gap <= -(-n // k) + 1 for gap in gaps), (n, k, first)


@pytest.mark.unit
def test_a_spent_budget_sends_the_task_up_the_points_already_measured():
    """With no probe left, a point whose accuracy misses hands the task to the next larger point that passed
    the KL divergence; when none is left, nothing passes."""
    frontier = sweep(random_table(7, tensors=8))
    gate = Gate(max_kl_divergence=1e9, max_ppl_increase_pct=25, min_accuracy=0.5)
    last = len(frontier) - 1
    measure, measure_task, seen, tasks = synthetic(frontier, factor=1.0, accuracy_from=last // 2)
    results = search(frontier, measure, measure_task, gate, first=0, budget=3, task=True)
    assert len(seen) == 3 and tasks == sorted(seen, reverse=True)[: len(tasks)]
    assert chosen(results) == max((k for k in seen if k < last // 2), default=None)
    measure, measure_task, seen, tasks = synthetic(frontier, factor=1.0, accuracy_from=0)
    results = search(frontier, measure, measure_task, gate, first=0, budget=3, task=True)
    assert chosen(results) is None and sorted(tasks) == sorted(seen)


@pytest.mark.unit
def test_the_search_spends_no_more_than_its_budget_and_may_find_nothing():
    frontier = sweep(random_table(3, tensors=8))
    gate = Gate(max_kl_divergence=0.5, max_ppl_increase_pct=25, min_accuracy=None)
    measure, measure_task, seen, tasks = synthetic(frontier, factor=1e9)  # nothing passes
    results = search(frontier, measure, measure_task, gate, first=len(frontier) // 2, budget=3, task=False)
    assert len(seen) == 3 and chosen(results) is None and tasks == []
    assert all(r["misses"] and r["misses"][0].startswith("KL divergence") for r in results.values())
    measure, measure_task, seen, tasks = synthetic(frontier, factor=1e-9)  # everything passes: the smallest point
    assert chosen(search(frontier, measure, measure_task, gate, first=0, budget=20, task=False)) == len(frontier) - 1
    assert tasks == []  # no task: the KL divergence decides


@pytest.mark.unit
def test_recipe_lines_name_exactly_one_tensor(tmp_path):
    names = ["blk.1.attn_q.weight", "blk.11.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"]
    types = dict(zip(names, ["q4_K", "q8_0", "iq2_xxs", "q6_K"]))
    path = tmp_path / "recipe.txt"
    recipe.write(path, types)
    assert recipe.read(path) == types
    for line in path.read_text().split():
        pattern, _ = line.split("=")
        assert sum(bool(re.search(pattern, n)) for n in names) == 1  # as llama-quantize matches it
    path.write_text("blk.1.attn_q.weight=q4_K\n")
    with pytest.raises(InputError, match=r"recipe.txt:1: not a recipe line"):
        recipe.read(path)


@pytest.mark.unit
def test_sampled_rows_and_relative_error():
    assert list(sample_rows(5, 0)) == list(sample_rows(5, 8)) == [0, 1, 2, 3, 4]
    assert list(sample_rows(101, 3)) == [0, 50, 100]
    # the same weights sampled from a matrix of any width, never fewer than MIN_ROWS rows nor more than it has
    assert rows_for(4096, 11008, 1 << 17) == 32 and rows_for(1024, 4096, 1 << 17) == 128
    assert rows_for(11008, 4096, 1 << 17) == MIN_ROWS and rows_for(576, 49, 1 << 17) == 49
    assert rows_for(576, 1000, 0) == 1000
    w = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    q = w + np.array([[0.1, 0.0], [0.0, 0.2]], dtype=np.float32)
    # column weights 2 and 1: noise 2 * 0.01 + 1 * 0.04, signal 2 * (1 + 9) + 1 * (4 + 16)
    assert relative_error(w, q, np.array([2.0, 1.0])) == pytest.approx(0.06 / 40, rel=1e-5)  # q in float32


@pytest.fixture(scope="module")
def k_gguf(llama_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("auto_quant")
    return convert(make_tiny_llama(work / "base", **K_SIZES), work / "f16.gguf")


@pytest.mark.llama
def test_a_spread_copy_of_the_f16_logits_scores_the_same_windows_in_its_order(llama_bin, k_gguf, tmp_path):
    """The search's KL runs read the f16 log-probabilities with their windows spread over the text: llama-perplexity
    scores the same windows, so its figures over all of them are the file's in the text's order."""
    from helpers.models import prose

    text = tmp_path / "text.txt"
    text.write_text(prose(8000))
    logits, spread, q4 = tmp_path / "f16.kld", tmp_path / "spread.kld", tmp_path / "q4_0.gguf"
    perplexity_gguf(llama_bin, k_gguf, text, 128, 8, 1, logits)
    spread_logits(logits, spread)
    assert spread.stat().st_size == logits.stat().st_size
    windows = np.fromfile(logits, dtype="<i4", count=8 * 128, offset=20).reshape(8, 128)
    spread_windows = np.fromfile(spread, dtype="<i4", count=8 * 128, offset=20).reshape(8, 128)
    assert (spread_windows == windows[spread_order(8)]).all() and not (spread_windows == windows).all()
    run_quantize(llama_bin, k_gguf, q4, "q4_0", 1)
    ours, theirs = (kl_divergence(llama_bin, q4, f, 128, 1) for f in (spread, logits))
    assert ours["windows"] == theirs["windows"] == 8
    for key in ("kl_divergence", "perplexity", "f16_perplexity", "top1_agreement"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4), key
    # a truncated file is refused, naming it, and leaves no copy
    cut = tmp_path / "cut.kld"
    cut.write_bytes(logits.read_bytes()[:-2])
    with pytest.raises(InputError, match=rf"^{re.escape(str(cut))}: not a whole llama-perplexity --save-logits file"):
        spread_logits(cut, tmp_path / "out.kld")
    assert not list(tmp_path.glob("out.kld*"))


@pytest.mark.llama
def test_a_recipe_is_written_as_it_says_and_rounded_as_the_sensitivity_rounds_it(llama_bin, k_gguf, tmp_path):
    """llama-quantize follows a recipe tensor by tensor (checked from the written header), and every tensor's
    weights in the file are exactly ggml's round trip that the sensitivity measures (no importance matrix)."""
    header = read_header(k_gguf)
    matrices = [t for t in header.tensors.values() if len(t.shape) == 2]
    ladder = ["q8_0", "q4_K", "q4_0", "iq4_nl", "q3_K", "q2_K", "q6_K"]
    types = {t.name: kind for t, kind in zip(matrices, itertools.cycle(ladder))}
    # an override equal to the positional type must hold too (llama.cpp #22544)
    types[matrices[0].name] = "q4_K"
    path = tmp_path / "recipe.txt"
    recipe.write(path, types)
    out = tmp_path / "auto.gguf"
    subprocess.run([str(llama_bin / "llama-quantize"), "--tensor-type-file", str(path), str(k_gguf), str(out), "Q4_K_S"],
                   check=True, capture_output=True)  # fmt: skip
    recipe.check_written(out, types)
    f16, written = open_gguf(k_gguf), open_gguf(out)
    source = {t.name: np.asarray(t.data, dtype=np.float32) for t in f16.tensors}
    from gguf.quants import dequantize

    for t in written.tensors:
        if t.name in types:
            ours = round_trip(llama_bin, ggml_type(types[t.name]), source[t.name], None)
            assert np.array_equal(dequantize(t.data, t.tensor_type), ours), t.name
    wrong = {**types, matrices[1].name: "q8_0" if types[matrices[1].name] != "q8_0" else "q4_0"}
    with pytest.raises(RuntimeError, match=f"did not follow the recipe: {re.escape(matrices[1].name)} is"):
        recipe.check_written(out, wrong)


@pytest.mark.llama
def test_candidates_are_written_with_llama_quantizes_bytes_whatever_the_threads(llama_bin, k_gguf, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    """A candidate made from tensors quantized once (cpuforge.autoquant.tensors) holds, tensor for tensor, the
    bytes llama-quantize writes from the same recipe, and the same file comes out on one thread or two, its
    tensors quantized whole or in shares of a few rows."""
    header = read_header(k_gguf)
    matrices = [t for t in header.tensors.values() if len(t.shape) == 2]
    types = {t.name: kind for t, kind in zip(matrices, itertools.cycle(["q4_K", "iq4_nl", "q3_K", "q6_K", "q5_0"]))}
    path = tmp_path / "recipe.txt"
    recipe.write(path, types)
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([str(llama_bin / "llama-quantize"), "--tensor-type-file", str(path), str(k_gguf), str(theirs),
                    "Q4_K_S"], check=True, capture_output=True)  # fmt: skip
    Tensors(llama_bin, k_gguf, None, tmp_path / "whole", 1).write(types, tmp_path / "ours.gguf", {"test": 1})
    monkeypatch.setattr("cpuforge.autoquant.tensors.CHUNK_WEIGHTS", 1000)  # a few rows of 256 per share
    shared = Tensors(llama_bin, k_gguf, None, tmp_path / "shared", 2)
    shared.write(types, tmp_path / "shared.gguf", {"test": 1})
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "shared.gguf").read_bytes()
    # (llama-quantize lays the tensors out layer by layer, by name; a candidate keeps the f16 file's order)
    ours = {t.name: (t.tensor_type, bytes(t.data)) for t in open_gguf(tmp_path / "ours.gguf").tensors}
    assert ours == {t.name: (t.tensor_type, bytes(t.data)) for t in open_gguf(theirs).tensors}
    # llama.cpp reads the candidate as it reads llama-quantize's file
    assert shared.path(matrices[0].name, types[matrices[0].name]).is_file()
    out = subprocess.run([str(llama_bin / "llama-cli"), "-m", str(tmp_path / "ours.gguf"), "-p", "the", "-n", "4",
                          "-st", "-t", "1", "--temp", "0", "--no-warmup"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.llama
def test_sensitivity_offers_each_tensor_the_types_that_fit_it(llama_bin, tmp_path):
    """Rows of 64 take only the 32-weight blocks; without an importance matrix no type that needs one."""
    gguf = convert(make_tiny_llama(tmp_path / "base"), tmp_path / "f16.gguf")
    table = measure(llama_bin, gguf, None, ["q8_0", "q4_K", "q4_0", "iq2_xxs", "iq4_nl"], 16)
    assert measure(llama_bin, gguf, None, ["q8_0", "q4_K", "q4_0", "iq2_xxs", "iq4_nl"], 16, threads=2) == table
    widths = {t.name: t.shape[0] for t in read_header(gguf).tensors.values() if len(t.shape) == 2}
    assert set(table) == set(widths)
    for name, options in table.items():
        kinds = [o.type for o in options]
        assert kinds == (["q8_0", "q4_K", "q4_0", "iq4_nl"] if widths[name] % 256 == 0 else ["q8_0", "q4_0", "iq4_nl"])
        by = {o.type: o for o in options}
        assert 0 < by["q8_0"].error < by["q4_0"].error and by["q8_0"].bytes > by["q4_0"].bytes


def test_the_screen_keeps_evenly_spaced_layers_that_outweigh_the_output_twice():
    layer = {"attn_q": (64, 64), "ffn_up": (64, 256), "attn_norm": (64,)}
    shapes = {f"blk.{i}.{k}.weight": s for i in range(10) for k, s in layer.items()}
    # a layer's matrices hold 20480 weights; an output matrix of 64 x 1000 needs 7 layers to be outweighed twice
    assert cut_layers({**shapes, "output.weight": (64, 1000)}, 10) == [0, 2, 3, 5, 6, 7, 9]
    assert cut_layers({**shapes, "token_embd.weight": (64, 100)}, 10) == [5]  # tied: the embeddings are the output
    assert cut_layers({**shapes, "output.weight": (64, 100_000)}, 10) == list(range(10))


@pytest.mark.llama
def test_a_screen_file_is_planned_as_llama_quantize_writes_and_benches_as_a_cut(llama_bin, k_gguf, tmp_path):
    """llama-quantize --dry-run's types are those of the file it writes; the screen file holds them on the cut's
    layers, renumbered, with no bytes quantized, and llama-bench runs it."""
    header = read_header(k_gguf)
    for qtype, pure in (("q4_k_m", False), ("q3_k_s", True)):
        plan = planned_types(llama_bin, k_gguf, qtype, None, pure)
        written = tmp_path / f"{qtype}.gguf"
        run_quantize(llama_bin, k_gguf, written, qtype, 1, pure=pure)
        assert plan == {n: type_name(ggml_type(t.type)) for n, t in read_header(written).tensors.items()}
        # the search makes the candidate from its plan's matrices, quantized once: llama-quantize's bytes and type
        ours = tmp_path / f"{qtype}-ours.gguf"
        matrices = {n: plan[n] for n, t in header.tensors.items() if len(t.shape) == 2}
        Tensors(llama_bin, k_gguf, None, tmp_path / f"{qtype}-tensors", 1).write(matrices, ours, {"test": 1}, qtype)
        assert {t.name: (t.tensor_type, bytes(t.data)) for t in open_gguf(ours).tensors} == \
            {t.name: (t.tensor_type, bytes(t.data)) for t in open_gguf(written).tensors}
        key = ["general.file_type"]
        assert read_metadata(ours, key) == read_metadata(written, key)
    last = n_layers(header.tensors) - 1
    write_screen(k_gguf, tmp_path / "screen.gguf", plan, [last])  # the last layer alone, as layer 0
    screen = read_header(tmp_path / "screen.gguf")
    kept = {n.replace(f"blk.{last}.", "blk.0."): n for n in header.tensors
            if not n.startswith("blk.") or n.startswith(f"blk.{last}.")}  # fmt: skip
    assert last > 0 and set(screen.tensors) == set(kept)
    assert all(type_name(ggml_type(t.type)) == plan[kept[n]] for n, t in screen.tensors.items())
    assert read_metadata(tmp_path / "screen.gguf", ["llama.block_count"]) == {"llama.block_count": 1}
    (row,) = bench_side_by_side(llama_bin, [tmp_path / "screen.gguf"], 1, 4, 2)
    # four tokens of a one-layer tiny model take far less than a second: timed again, generating more
    assert row["tg_tps"] > 0 and row["tg_tokens"] > 4 and "tg_tps_std" in row
