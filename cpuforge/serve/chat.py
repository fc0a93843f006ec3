"""Chat with a model in the terminal, on CPU: a GGUF the workflow made, or the merged HF model.

A GGUF runs through llama-cpp-python on the pinned libllama (--llama-bin, default: the
workflow's build); a HF folder runs through transformers' generate on the CPU. Both format
the conversation with the model's own chat template and stream the answer (beam search
prints it when the search ends). A GGUF is fed the token ids transformers gives for that
prompt, from the merged model's tokenizer (results/{model}/merged beside the GGUF, or
--tokenizer FOLDER); without one, the GGUF's own template tokenized by llama.cpp.
Generation is greedy, up to 1024 new tokens, unless a generation config
(--generation-config, HF generation_config.json keys) or the flags say otherwise; flags win.
--threads (generation) and --threads-batch (prompt processing) default to
`recommended_threads` and `recommended_threads_batch` in the eval report
(results/{model}/report/metrics.json) when there is one, else the physical core count.
Type /reset to start a new conversation; Ctrl-D or Ctrl-C ends the chat.
"""

from __future__ import annotations

import codecs
import ctypes
import dataclasses
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from jinja2 import TemplateError

from cpuforge.errors import InputError
from cpuforge.io.gguf import gguf_context_length
from cpuforge.llama.runtime import (
    MAX_DEFAULT_CTX,
    apply_loras,
    cpu_backend,
    describe_cpu_backend,
    load_llama_cpp,
    load_model,
)
from cpuforge.paths import default_llama_bin
from cpuforge.text.prompt import CHATML, gguf_runtime_prompt, hf_chat_ids

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Generation:
    """Generation settings, named as in HF's GenerationConfig. The default is greedy decoding."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 1024
    num_beams: int = 1
    early_stopping: bool = True
    seed: int = 0

    def check(self) -> Generation:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.num_beams < 1:
            raise InputError(f"num_beams must be at least 1, got {self.num_beams}.")
        if self.do_sample and self.temperature <= 0:
            raise InputError(f"temperature must be above 0 when sampling, got {self.temperature}.")
        if self.do_sample and self.num_beams > 1:
            raise InputError("choose sampling (do_sample) or beam search (num_beams > 1), not both.")
        return self


def load_generation(path: Path | None = None, **overrides) -> Generation:
    """Defaults, then the keys of a generation config file that Generation knows, then `overrides` (None: unset)."""
    settings = {}
    if path is not None:
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: file not found.") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e}).") from None
        fields = {f.name: f.type for f in dataclasses.fields(Generation)}
        # a HF generation_config.json also holds token ids and such; those are the model's business
        settings = {k: v for k, v in config.items() if k in fields and v is not None}
    settings |= {k: v for k, v in overrides.items() if v is not None}
    return Generation(**settings).check()


class GGUFChat:
    """A GGUF model through llama-cpp-python on the pinned libllama, with GGUF LoRA adapters (file, scale)
    applied at run time."""

    def __init__(self, model: Path, threads: int, ctx_size: int = 0, llama_bin: Path | None = None, loras: list = (),
                 tokenizer: Path | None = None, threads_batch: int | None = None):  # fmt: skip
        if not model.is_file():
            raise InputError(f"{model}: file not found.")
        llama_bin = llama_bin or default_llama_bin(model)
        self.llama_cpp = load_llama_cpp(llama_bin)
        log.info("%s", describe_cpu_backend(cpu_backend(llama_bin)))
        threads_batch = threads_batch or threads
        ctx_size = ctx_size or min(gguf_context_length(model), MAX_DEFAULT_CTX)
        log.info("loading %s (%d threads, %d for prompts, context %d)", model, threads, threads_batch, ctx_size)
        # flash attention as llama-bench and llama-server run it on a CPU (their "auto" turns it on):
        # llama-cpp-python would leave it off, a few percent slower and a different rounding
        self.llm = load_model(self.llama_cpp, model, n_ctx=ctx_size, n_threads=threads, n_threads_batch=threads_batch,
                              flash_attn=True, verbose=False)  # fmt: skip
        self.adapters = apply_loras(self.llama_cpp, self.llm, list(loras))
        # the merged model's template and tokenizer, so the model reads the ids it was trained on
        self.prompt = gguf_runtime_prompt(model, self.llm, tokenizer)
        log.info("prompts: %s", self.prompt.describe())
        self.vocab = self.llama_cpp.llama_model_get_vocab(self.llm.model)
        self._piece = ctypes.create_string_buffer(256)
        self.n_generated = 0

    def prompt_tokens(self, messages: list[dict]) -> tuple[list[int], list[str]]:
        """The ids this chat evaluates for `messages`, and the stop strings of its template."""
        try:
            return self.prompt.ids(messages), self.prompt.stop
        except TemplateError as e:  # the template refuses the conversation (e.g. roles out of turn)
            raise InputError(f"the chat template refuses this conversation: {e}") from None

    def piece(self, token: int) -> bytes:
        n = self.llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            return self.piece(token)
        return self._piece.raw[:n]

    def stream(self, messages: list[dict], gen: Generation) -> Iterator[str]:
        """Yield the answer to `messages` piece by piece.

        This loop, not create_chat_completion, because that re-detokenizes the whole answer
        after every token (quadratic in its length) and runs several Python scans per token;
        here a token costs one piece lookup and an incremental UTF-8 decode, so a long answer
        runs at llama.cpp's own speed. Stops as that does: at an end-of-generation token, at the
        template's stop text, at max_new_tokens or at the end of the context.
        """
        if gen.num_beams > 1:
            raise InputError("beam search runs only on the HF model (--hf); llama.cpp decodes one sequence.")
        tokens, stops = self.prompt_tokens(messages)
        room = self.llm.n_ctx() - len(tokens)
        if room < 1:
            raise InputError(f"the conversation is {len(tokens)} tokens, the context holds {self.llm.n_ctx()}.")
        self.llm.set_seed(gen.seed)
        self.n_generated = 0  # tokens of the answer so far, end-of-generation token excluded
        # HF's meaning: greedy unless do_sample; then temperature, top-k and top-p, and no min-p
        temp = gen.temperature if gen.do_sample else 0.0
        # bytes that are not UTF-8 are dropped, as llama-cpp-python drops them
        decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        held = ""  # text that may be the start of a stop string
        for n, token in enumerate(
            self.llm.generate(
                tokens, temp=temp, top_k=gen.top_k, top_p=gen.top_p, min_p=0.0, repeat_penalty=gen.repetition_penalty
            ),
            start=1,
        ):
            if self.llama_cpp.llama_vocab_is_eog(self.vocab, token):
                break
            self.n_generated = n
            held += decoder.decode(self.piece(token))
            cut = min((held.find(s) for s in stops if s in held), default=-1)
            if cut >= 0:
                yield held[:cut]
                return
            keep = max((k for s in stops for k in range(len(s), 0, -1) if held.endswith(s[:k])), default=0)
            if len(held) > keep:
                yield held[: len(held) - keep]
                held = held[len(held) - keep :]
            if n >= min(gen.max_new_tokens, room):
                break
        yield held + decoder.decode(b"", final=True)


class HFChat:
    """A merged HF model folder through transformers' generate, on the CPU."""

    def __init__(self, folder: Path, threads: int):
        if not (folder / "config.json").is_file():
            raise InputError(f"{folder}: not a HF model folder (no config.json).")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        log.info("loading %s (%d threads)", folder, threads)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if not self.tokenizer.chat_template:
            log.warning("%s has no chat template; using ChatML, as llama.cpp does", folder)
            self.tokenizer.chat_template = CHATML
        # float32: half-precision matmuls are slow on many CPUs and the weights were merged in f32
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()

    def stream(self, messages: list[dict], gen: Generation) -> Iterator[str]:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        ids = hf_chat_ids(self.tokenizer, messages)
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        n_prompt = len(ids)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and n_prompt >= limit:
            raise InputError(f"the conversation is {n_prompt} tokens, the model holds {limit}.")
        config = GenerationConfig(
            do_sample=gen.do_sample, max_new_tokens=gen.max_new_tokens, num_beams=gen.num_beams,
            repetition_penalty=gen.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
            eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
            **({"early_stopping": gen.early_stopping} if gen.num_beams > 1 else {}),
            **(dict(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p) if gen.do_sample else {}),
        )  # fmt: skip
        torch.manual_seed(gen.seed)
        if gen.num_beams > 1:  # beams are ranked only at the end: nothing to stream before that
            with torch.no_grad():
                out = self.model.generate(**inputs, generation_config=config)
            yield self.tokenizer.decode(out[0][n_prompt:], skip_special_tokens=True)
            return
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        def work():
            with torch.no_grad():
                self.model.generate(
                    **inputs, generation_config=config, streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([Stopped()]),
                )  # fmt: skip

        # generate in a thread, so this one can hand out text as the streamer receives it
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            stop.set()
            worker.join()


def answer(chat, messages: list[dict], gen: Generation, write: Callable[[str], object]) -> str:
    """Stream one answer through `write` and return it whole."""
    pieces = []
    for piece in chat.stream(messages, gen):
        write(piece)
        pieces.append(piece)
    return "".join(pieces)


def write_stdout(text: str) -> None:
    # the chat's own output: the one place where cpuforge prints rather than logs
    sys.stdout.write(text)
    sys.stdout.flush()


def repl(chat, gen: Generation, system: str | None = None, read=input, write=write_stdout) -> None:
    """The interactive loop, until end of input. A turn that cannot run is dropped, and the chat goes on."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages = list(start)
            write("(new conversation)\n")
            continue
        messages.append({"role": "user", "content": line})
        try:
            text = answer(chat, messages, gen, write)
        except InputError as e:
            log.error("%s", e)
            messages.pop()
            continue
        write("\n")
        messages.append({"role": "assistant", "content": text})


def open_chat(model: Path, hf: bool, threads: int, ctx_size: int = 0, llama_bin: Path | None = None, loras=(),
              tokenizer: Path | None = None, threads_batch: int | None = None):  # fmt: skip
    if hf and loras:
        raise InputError("--lora applies a GGUF LoRA to a GGUF base; the HF model (--hf) is the merged one already.")
    if hf:
        return HFChat(model, threads)
    return GGUFChat(model, threads, ctx_size, llama_bin, loras, tokenizer, threads_batch)
