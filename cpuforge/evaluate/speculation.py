"""Draftless speculative decoding, measured on the model's own task: does it make this model's answers faster?

The pinned llama-server drafts tokens without a draft model (--spec-type): from n-grams of the text so far,
which the model then checks in one batch. Where the drafts are accepted, several tokens come for the cost of
one pass over the weights; where not, the check is wasted work. Published CPU figures are mixed, so each
setting is measured here: llama-server as scripts.serve runs it, on the task's held-out prompts (the same
token ids every stage reads), greedy, each setting and the plain server in turns for `rounds` rounds, each
its best round; tokens/s of generation (llama-server's own timings) and the drafts' acceptance rate. A
setting wins only where every answer is the plain server's, token for token the same text, some of its drafts
were accepted (else it decoded plainly, and any gain is noise), and its speed is above the plain server's by
more than the tolerance; the report then says so, and scripts.serve turns the
best winner on for this model.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import tempfile
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.serve.engine import Engine, EngineFailed, llama_server_command, upstream_session
from cpuforge.serve.speculation import PLAIN, SETTINGS

log = logging.getLogger(__name__)


async def serve_answers(bin_dir: Path, gguf: Path, prompts: list[list[int]], max_new_tokens: int, threads: int,
                        extra: list[str]) -> dict:  # fmt: skip
    """One llama-server with `extra` flags, started and stopped as scripts.serve does it (cpuforge.serve.engine),
    answering every prompt (token ids) greedily, in turn: the answers, generation's tokens/s over all of
    them, and the drafts made and accepted."""
    with tempfile.TemporaryDirectory(prefix="cpuforge-spec-") as private:
        sock, key = Path(private) / "llama-server.sock", secrets.token_hex(16)
        ctx = max(map(len, prompts)) + max_new_tokens
        cmd = [*llama_server_command(bin_dir, gguf, sock, "m", threads, ctx, 1), *extra]
        async with upstream_session(sock, key) as upstream:
            engine = Engine(cmd, sock, key, upstream, restarts=0)
            try:
                await engine.start()
            except EngineFailed as e:
                raise InputError(f"{e}; see its log above.") from None
            try:
                answers, tokens, ms, drafted, accepted = [], 0, 0.0, 0, 0
                for ids in prompts:
                    body = {"prompt": ids, "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1, "seed": 0,
                            "cache_prompt": False, "return_tokens": True}  # fmt: skip
                    async with upstream.post("/completion", json=body) as response:
                        if response.status != 200:
                            raise RuntimeError(f"llama-server answered {response.status}: {await response.text()}")
                        out = await response.json()
                    answers.append(out["tokens"])
                    t = out["timings"]
                    tokens, ms = tokens + t["predicted_n"], ms + t["predicted_ms"]
                    drafted, accepted = drafted + t.get("draft_n", 0), accepted + t.get("draft_n_accepted", 0)
            finally:
                await engine.stop()
    return {"answers": answers, "tg_tps": 1000 * tokens / ms if ms else 0.0, "tokens": tokens, "drafted": drafted,
            "accepted": accepted}  # fmt: skip


def measure(bin_dir: Path, gguf: Path, prompts: list[list[int]], max_new_tokens: int, threads: int, rounds: int,
            settings: dict[str, list[str]] = SETTINGS) -> dict[str, dict]:  # fmt: skip
    """Every setting in turns for `rounds` rounds: each its best round's tokens/s, its acceptance rate, and
    whether all its answers were the plain server's."""
    best: dict[str, dict] = {}
    for r in range(rounds):
        for name, extra in settings.items():
            run = asyncio.run(serve_answers(bin_dir, gguf, prompts, max_new_tokens, threads, extra))
            log.info("round %d, %s: %.1f tokens/s, %d of %d drafts accepted", r + 1, name, run["tg_tps"],
                     run["accepted"], run["drafted"])  # fmt: skip
            if name not in best or run["tg_tps"] > best[name]["tg_tps"]:
                best[name] = run
    plain = best[PLAIN]["answers"]
    return {name: {"flags": settings[name], "tg_tps": run["tg_tps"], "tokens": run["tokens"],
                   "drafted": run["drafted"], "accepted": run["accepted"],
                   "acceptance": run["accepted"] / run["drafted"] if run["drafted"] else None,
                   "same_answers": run["answers"] == plain,
                   "differing_rows": [i for i, (a, b) in enumerate(zip(run["answers"], plain, strict=True)) if a != b]}
            for name, run in best.items()}  # fmt: skip


def verdict(results: dict[str, dict], tolerance_pct: float) -> dict:
    """The setting scripts.serve should turn on (None: plain decoding), and one sentence saying why."""
    plain = results[PLAIN]["tg_tps"]
    # a setting none of whose drafts was accepted decoded plainly: any speed it gained is the machine's noise
    winners = [(r["tg_tps"], name) for name, r in results.items()
               if name != PLAIN and r["same_answers"] and r["accepted"] > 0
               and r["tg_tps"] > plain * (1 + tolerance_pct / 100)]  # fmt: skip
    if winners:
        speed, name = max(winners)
        r = results[name]
        return {"setting": name, "flags": r["flags"],
                "sentence": f"{name} wins: {speed:.1f} tokens/s against {plain:.1f} plain ({speed / plain:.2f}×), "
                            f"{100 * (r['acceptance'] or 0):.0f} % of its drafts accepted, every answer the same; "
                            "scripts.serve turns it on for this model."}  # fmt: skip
    fastest = max((r["tg_tps"], name) for name, r in results.items() if name != PLAIN)
    changed = [name for name, r in results.items() if not r["same_answers"]]
    idle = [name for name, r in results.items() if name != PLAIN and r["accepted"] == 0]
    why = f"the fastest, {fastest[1]}, gives {fastest[0]:.1f} tokens/s against {plain:.1f} plain ({fastest[0] / plain:.2f}×)"
    if changed:
        why += f"; {', '.join(changed)} changed answers"
    if idle:
        why += f"; {', '.join(idle)} had no draft accepted (the task's answers do not repeat its text)"
    return {"setting": None, "flags": [],
            "sentence": f"No draftless speculation wins on this model here: {why}; scripts.serve decodes plainly."}
