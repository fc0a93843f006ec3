"""How a quant is judged and which file ships: the bounds and the paired test against hand-computed cases, the
gate's phrases and its refusal of bad values, and the objective's choice, ties and dominance."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpuforge.autoquant.decide import (
    FINAL,
    SCREEN,
    beaten_by,
    choose,
    dominates,
    faster,
    mark_dominated,
    order,
    shared_run,
)
from cpuforge.errors import InputError
from cpuforge.evaluate.bench import lasting_tokens, over_rounds, turned
from cpuforge.evaluate.fidelity import (
    certifies,
    compare,
    lower_bound,
    mcnemar_p,
    rows_needed,
    shown_drop,
    upper_bound,
)
from cpuforge.evaluate.gate import Gate

pytestmark = pytest.mark.unit


def test_clopper_pearson_upper_bounds_against_closed_forms_and_a_table():
    # no failure in n: 1 - alpha ** (1 / n), the "rule of three" region
    assert upper_bound(0, 40, 0.95) == pytest.approx(1 - 0.05 ** (1 / 40), abs=1e-9)
    assert upper_bound(0, 40, 0.95) == pytest.approx(0.0722, abs=1e-4)
    # n - 1 of n: P(X <= n - 1) = 1 - p ** n = alpha
    assert upper_bound(3, 4, 0.95) == pytest.approx(0.95 ** (1 / 4), abs=1e-9)
    # the one-sided 95 % exact upper limit for 1 of 10 in the standard tables
    assert upper_bound(1, 10, 0.95) == pytest.approx(0.3942, abs=1e-4)
    assert upper_bound(40, 40, 0.95) == 1.0
    assert [upper_bound(k, 40, 0.95) < 0.2 for k in range(6)] == [True] * 4 + [False] * 2  # the default's reach
    assert rows_needed(0.05, 0.95) == 59 and rows_needed(0.01, 0.95) == 299
    with pytest.raises(ValueError):
        upper_bound(3, 2, 0.95)


def test_exact_mcnemar_and_the_drop_the_flips_show():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(4, 0) == pytest.approx(1 / 16)
    assert mcnemar_p(5, 1) == pytest.approx(7 / 64)  # P(X >= 5) for X ~ Bin(6, 1/2)
    # the lower bound: P(X >= k) = alpha; for k = n, p ** n = alpha
    assert lower_bound(5, 5, 0.95) == pytest.approx(0.05 ** (1 / 5), abs=1e-9)
    assert lower_bound(0, 7, 0.95) == 0.0
    # no flips, or as many gains as losses: no drop shown
    assert shown_drop(0, 0, 40, 0.95) == 0.0 and shown_drop(3, 3, 40, 0.95) == 0.0
    # four losses and no gain: McNemar's p is 0.0625, not significant at 95 %, so no drop shown; five: 0.031
    assert shown_drop(4, 0, 40, 0.95) == 0.0
    assert shown_drop(5, 0, 40, 0.95) == pytest.approx(5 / 40 * (2 * 0.05 ** (1 / 5) - 1))
    # a drop is shown exactly where the one-sided McNemar test rejects "as accurate"
    for worse, better in ((5, 0), (6, 1), (7, 2), (8, 1), (4, 0), (6, 2), (9, 3)):
        assert (shown_drop(worse, better, 40, 0.95) > 0) == (mcnemar_p(worse, better) < 0.05), (worse, better)
    # gains offset losses: the drop shown never grows with a wrong -> right flip
    assert shown_drop(9, 0, 40, 0.95) > shown_drop(9, 1, 40, 0.95) > shown_drop(9, 2, 40, 0.95)


def test_compare_counts_agreement_and_both_flips():
    reference = [True, True, True, False, False]
    right = [True, False, True, True, False]
    agree = [True, False, True, False, True]
    f = compare(reference, right, agree, 0.95)
    assert (f["rows"], f["agree"], f["worse"], f["better"]) == (5, 3, 1, 1)
    assert f["disagreement_bound"] == pytest.approx(upper_bound(2, 5, 0.95))
    with pytest.raises(ValueError):
        compare(reference, right[:4], agree, 0.95)


def test_what_the_rows_can_certify_is_said_in_one_sentence():
    assert certifies(40, 0.95, 0.2).startswith("40 held-out rows bound a quant's disagreement with the f16 answers "
                                               "no tighter than 7.2 % at 95 % confidence; a bound of 5 % needs 59 rows")  # fmt: skip
    assert "no quant can pass; give at least 59 rows" in certifies(20, 0.95, 0.05)


def figures(kl=0.1, err=0.0, ppl=5.0, rows=40, agree=40, worse=0, better=0, accuracy=None) -> dict:
    reference = [True] * (rows - 2) + [False] * 2
    right = list(reference)
    for i in range(worse):
        right[i] = False
    for i in range(better):
        right[rows - 1 - i] = True
    agreed = [i >= rows - agree for i in range(rows)]
    return {"kl_divergence": kl, "kl_divergence_err": err, "ppl_increase_pct": ppl,
            "fidelity": compare(reference, right, agreed, 0.95), "accuracy": accuracy}  # fmt: skip


def test_the_gate_passes_a_quant_that_answers_like_the_reference_and_names_every_limit_missed():
    gate = Gate()
    assert gate.misses(figures()) == []
    assert gate.misses(figures(agree=37, worse=2, better=1)) == []  # 3 of 40 differ: bounded at 18.3 %
    missed = gate.misses(figures(kl=0.39, err=0.01, ppl=30, agree=29, worse=9, better=0, accuracy=0.5))
    assert [m.split(" eval.gate.")[-1].split()[0] for m in missed] == [
        "max_kl_divergence", "max_ppl_increase_pct", "max_disagreement", "max_accuracy_drop"]  # fmt: skip
    assert missed[0] == "KL divergence from the f16 GGUF 0.39 ± 0.01 (at 95 % up to 0.4064) > eval.gate.max_kl_divergence 0.4"
    assert missed[2] == "answers unlike the f16 GGUF's on 11/40 rows (at 95 % up to 41.4 %) > eval.gate.max_disagreement 0.2"
    assert missed[3] == ("9 right->wrong against 0 wrong->right flips (an accuracy drop at 95 % of at least "
                         f"{(2 * 0.05 ** (1 / 9) - 1) * 9 / 40 * 100:.1f} %) > eval.gate.max_accuracy_drop 0")  # fmt: skip
    # a margin lets a shown drop within it pass
    assert Gate(max_accuracy_drop=0.2).misses(figures(agree=31, worse=9))[-1].startswith("answers unlike")
    # the absolute floor is off by default and checked when set
    assert Gate(min_accuracy=0.7).misses(figures(accuracy=0.5))[-1] == "task accuracy 0.500 < eval.gate.min_accuracy 0.7"
    # without a task only the KL divergence and perplexity judge
    assert gate.misses({"kl_divergence": 0.1, "ppl_increase_pct": 1.0}) == []


@pytest.mark.parametrize(("words", "message"), [
    (["confidence=1"], "eval.gate.confidence: 1.0 is outside (0.5, 1)."),
    (["confidence=0.5"], "eval.gate.confidence: 0.5 is outside (0.5, 1)."),
    (["max_disagreement=1.5"], "eval.gate.max_disagreement: 1.5 is outside [0, 1]."),
    (["max_kl_divergence=-0.1"], "eval.gate.max_kl_divergence: -0.1 is outside [0, inf)."),
    (["max_accuracy_drop=lots"], "eval.gate.max_accuracy_drop: 'lots' is not a number."),
    (["kl=0.4"], "--gate 'kl=0.4': expected KEY=VALUE with KEY one of confidence, max_accuracy_drop"),
])  # fmt: skip
def test_the_gate_refuses_bad_values_by_name(words, message):
    with pytest.raises(InputError) as err:
        Gate.parse(words)
    assert str(err.value).startswith(message)


def test_the_gate_round_trips_through_its_words():
    gate = Gate(confidence=0.9, max_disagreement=0.1, min_accuracy=0.6)
    assert Gate.parse(gate.words()) == gate and Gate.parse(Gate().words()) == Gate()
    assert Gate().describe().endswith("max_ppl_increase_pct = 25, min_accuracy = off")


def cand(name, size, tg, passed=True, kl=0.1) -> dict:
    return {"name": name, "tensor_bytes": size, "tg_tps": tg, "passed": passed, "kl_divergence": kl}


def test_speeds_within_the_tolerance_tie_and_a_tie_goes_to_the_smaller_file():
    a, b = cand("a", 80, 100.0), cand("b", 70, 96.0)
    assert not faster(a, b, 0.05) and not faster(b, a, 0.05) and faster(a, b, 0.03)
    assert not dominates(b, a) and not dominates(a, b)  # each is better on one side
    assert choose([a, b], "speed", 0.05) is b and choose([a, b], "speed", 0.03) is a
    # beyond the tolerance speed decides, whatever the size
    c = cand("c", 60, 80.0)
    assert choose([a, c], "speed", 0.05) is a and choose([a, c], "size", 0.05) is c
    # no larger and no slower, and smaller or faster: dominated
    assert dominates(b, cand("x", 75, 90.0)) and dominates(b, cand("y", 70, 95.0)) and not dominates(b, dict(b))
    # equal speed and size: the lower KL divergence
    d, e = cand("d", 70, 96.0, kl=0.2), cand("e", 70, 96.0, kl=0.1)
    assert choose([d, e], "speed", 0.05) is e and choose([d, e], "size", 0.05) is e
    # a failing candidate is never chosen and dominates nothing
    f = cand("f", 10, 500.0, passed=False)
    assert choose([a, f], "speed", 0.05) is a and not dominates(f, a) and choose([f], "speed", 0.05) is None


def test_the_choice_is_undominated_and_within_the_tolerance_of_the_fastest_where_ties_chain():
    """F ties A, A ties B, F does not tie B. Ties are not a dominance (they do not chain): the choice is the
    smallest of the undominated candidates tied with the fastest, A, and nothing measured beats it."""
    f, a, b, slow_big = cand("F", 100, 100.0), cand("A", 90, 96.0), cand("B", 80, 92.0), cand("S", 95, 90.0)
    every = [f, a, b, slow_big]
    assert not faster(f, a, 0.05) and not faster(a, b, 0.05) and faster(f, b, 0.05)
    assert choose(every, "speed", 0.05) is a and choose(every, "size", 0.05) is b
    for objective in ("speed", "size"):
        best = choose(every, objective, 0.05)
        assert not any(dominates(other, best) for other in every)
    mark_dominated(every)
    assert [c["dominated_by"] for c in every] == [None, None, None, "A"]


def test_candidates_are_verified_best_first_and_the_rest_pruned_once_one_passes():
    slow_small, fast, fast_big, tied_small = cand("s", 50, 60.0), cand("f", 90, 120.0), cand("g", 120, 118.0), \
        cand("t", 70, 116.0)  # fmt: skip
    assert [c["name"] for c in order([slow_small, fast, fast_big, tied_small], "speed")] == ["f", "g", "t", "s"]
    assert [c["name"] for c in order([slow_small, fast, fast_big, tied_small], "size")] == ["s", "t", "f", "g"]
    verified = [fast]
    assert beaten_by(fast_big, verified, "speed", 0.05) is fast  # larger and slower: dominated
    assert beaten_by(tied_small, verified, "speed", 0.05) is None  # tied and smaller: it could win the tie
    assert beaten_by(slow_small, verified, "speed", 0.05) is fast  # slower beyond the tolerance
    assert beaten_by(slow_small, verified, "size", 0.05) is None and beaten_by(fast_big, verified, "size", 0.05) is fast
    assert beaten_by(tied_small, [cand("x", 10, 500.0, passed=False)], "speed", 0.05) is None


def test_two_candidates_are_compared_in_the_last_run_both_took_part_in():
    """The screen ran every uniform and listed file, the final run only the passing ones, whole: a failing file
    is judged by the screen, two passing ones by the final run, a failing mix (in no run) by neither."""
    a = {**cand("a", 10, 50.0), "screen_tg_tps": 100.0}
    b = {**cand("b", 12, None, passed=False), "screen_tg_tps": 90.0}
    c = {**cand("c", 11, 60.0), "screen_tg_tps": 80.0}
    del b["tg_tps"]
    m = {"name": "mix 3", "tensor_bytes": 30, "passed": False}
    assert shared_run(a, b) == SCREEN and shared_run(a, c) == FINAL and shared_run(a, m) is None
    mark_dominated([a, b, c, m])
    assert [x["dominated_by"] for x in (a, b, c, m)] == [None, "a", None, None]  # c is faster than a when whole
    assert order([a, b, c], "speed", SCREEN) == [a, b, c] and choose([a, b, c], "speed", 0.05) is c


def test_a_difference_inside_the_runs_noise_is_a_tie():
    a, b = cand("a", 80, 100.0), cand("b", 70, 80.0)
    assert faster(a, b, 0.05)
    a["tg_tps_std"], b["tg_tps_std"] = 12.0, 16.0  # combined 20: the difference is inside the noise
    assert not faster(a, b, 0.05) and choose([a, b], "speed", 0.05) is b
    assert faster({**a, "tg_tps": 101.0}, b, 0.05)


def test_a_speed_is_timed_over_repetitions_of_at_least_a_second_where_a_few_hundred_tokens_allow():
    assert lasting_tokens(32, 100.0) == 128  # 0.32 s a repetition: four times as many tokens
    assert lasting_tokens(32, 32.0) == 32  # exactly a second
    assert lasting_tokens(32, 20.0) == 32  # a 7B file: 1.6 s already
    assert lasting_tokens(32, 270.0) == 256  # nine times would be 288: a tiny model stops at 256
    assert lasting_tokens(300, 5000.0) == 300  # never fewer than asked


def test_side_by_side_rounds_turn_the_files_order_and_a_files_speed_is_its_rounds_mean():
    files = [Path(f"{i}.gguf") for i in range(5)]
    assert [turned(files, r, 3) for r in range(3)] == [files, files[1:] + files[:1], files[3:] + files[:3]]
    assert turned(files, 0, 1) == files
    row = over_rounds([{"tg_tps": 100.0}, {"tg_tps": 110.0}, {"tg_tps": 120.0}])
    assert row == {"tg_tps": 110.0, "tg_tps_std": 10.0}
    assert over_rounds([{"pp_tps": 900.0, "tg_tps": 100.0}]) == {"pp_tps": 900.0, "pp_tps_std": 0.0, "tg_tps": 100.0,
                                                               "tg_tps_std": 0.0}  # fmt: skip


def test_the_f16_answers_are_read_as_eval_task_keeps_them_and_an_old_or_short_record_is_refused(tmp_path):
    """The search and the report compare every quant's answers with the f16 GGUF's token ids from eval_task's
    record; a record without them, or answering another number of rows, is refused naming the file."""
    from cpuforge.evaluate.task import read_answers
    from cpuforge.io.files import write_json

    path = tmp_path / "f16.json"
    write_json(path, {"answers": ["a", "b"], "answer_ids": [[5, 6], [7]], "right": [True, False]})
    assert read_answers(path, 2) == {"answers": [[5, 6], [7]], "right": [True, False]}
    with pytest.raises(InputError, match=rf"{path}: answers to 2 rows where the task has 3 held-out rows; delete it"):
        read_answers(path, 3)
    write_json(path, {"answers": ["a", "b"], "right": [True, False]})
    with pytest.raises(InputError, match=rf"{path}: its answers are not kept as token ids .*; delete it"):
        read_answers(path, 2)


def test_the_workflows_listed_files_are_named_by_their_quantize_record_and_a_stranger_is_refused(tmp_path):
    """A listed file the workflow made is the candidate its quantize record names (with the importance matrix
    or without); a GGUF without that record, or made with another importance matrix, is refused by name."""
    import json

    import gguf
    import numpy as np

    from cpuforge.autoquant.ship import listed_files
    from cpuforge.io.files import sha256_tree

    imatrix, other = tmp_path / "imatrix.gguf", tmp_path / "other.gguf"
    imatrix.write_bytes(b"one matrix")
    other.write_bytes(b"another matrix")

    def quantized(name: str, record: dict | None) -> Path:
        writer = gguf.GGUFWriter(tmp_path / name, "llama")
        if record is not None:
            writer.add_string("cpuforge.quantize", json.dumps(record))
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
        writer.close()
        return tmp_path / name

    q4 = quantized("q4_0.gguf", {"type": "q4_0", "inputs": {"gguf": "f", "imatrix": sha256_tree(imatrix)}})
    q8 = quantized("q8_0.gguf", {"type": "q8_0", "inputs": {"gguf": "f"}})
    assert listed_files([q4, q8], imatrix) == (["q4_0", "q8_0"], {"q4_0 + imatrix": q4, "q8_0": q8})
    assert listed_files([], None) == ([], {})
    with pytest.raises(InputError, match=rf"{q4}: made with another importance matrix than {other}; make it again"):
        listed_files([q4], other)
    with pytest.raises(InputError, match=rf"{q4}: made with an importance matrix, where the search is given none"):
        listed_files([q4], None)
    stranger = quantized("stranger.gguf", None)
    with pytest.raises(InputError, match=rf"{stranger}: no cpuforge.quantize record in its header"):
        listed_files([q8, stranger], imatrix)


def test_the_search_refuses_held_out_rows_without_the_f16_answers_to_them(tmp_path):
    """Held-out rows without the f16 GGUF's answers to them: refused before any file is read or written."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "scripts.auto_quant", "--llama-bin", str(tmp_path),
                             "--gguf", str(tmp_path / "f16.gguf"), "--sensitivity", str(tmp_path / "s.tsv"),
                             "--logits", str(tmp_path / "f16.kld"), "--merged", str(tmp_path), "--heldout",
                             str(tmp_path / "heldout.jsonl"), "--types", "q4_0", "--out", str(tmp_path / "a.gguf"),
                             "--recipe", str(tmp_path / "r.txt"), "--record", str(tmp_path / "s.json")],
                            capture_output=True, text=True, cwd=Path(__file__).parent.parent)  # fmt: skip
    assert result.returncode == 2 and "--heldout needs --reference: the f16 GGUF's answers" in result.stderr
    assert list(tmp_path.iterdir()) == []
