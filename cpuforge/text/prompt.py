"""The prompt path: a conversation rendered with the model's own chat template, as token ids.

Every runtime feeds the model the ids transformers' `apply_chat_template(...,
tokenize=True)` gives on the merged model's tokenizer, as training saw them:

- `ChatPrompt` renders and tokenizes as transformers does, with jinja2 and the
  `tokenizers` library on the merged folder's tokenizer.json, and no torch: the
  chat on a GGUF and the server's proxy use it (tests prove it equal to
  transformers on real templates and vocabularies);
- `prompt_ids` asks transformers itself, where a step has it loaded anyway (the
  HF chat, eval_task, check_generation, compare_imatrix);
- `GGUFPrompt` is the GGUF's own template rendered and tokenized by llama.cpp,
  the fallback of a GGUF with no merged folder beside it: its ids can differ
  from training's (a sentencepiece vocabulary puts a `▁` after every special
  token the template writes, llama.cpp #8584).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.paths import merged_folder
from cpuforge.text.task import messages

log = logging.getLogger(__name__)


# fixed conversations for the chat-template checks: system + user, multi-turn, no system
CONVERSATIONS = {
    "system+user": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And one more, please?"},
    ],
    "user only": [{"role": "user", "content": "Say hello in French."}],
}


# llama.cpp's fallback when a model has no chat template (llama-server uses it too), so a base
# model answers the same in the chat and through the server
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# the named special tokens transformers passes to a chat template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# names a message's reasoning goes by; transformers fills in all of them from the first one given
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def jinja_environment():
    """The environment transformers 5 compiles chat templates in (utils/chat_template_utils.py):
    sandboxed, trim_blocks and lstrip_blocks, loop controls, `{% generation %}` blocks, its own
    `tojson`, `raise_exception`, `strftime_now`, `dict` and `namespace`."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # transformers marks the assistant's tokens with it; the rendered text is the block's body
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace.")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals |= {"raise_exception": raise_exception, "strftime_now": lambda f: datetime.now().strftime(f),
                    "dict": TemplateDict(), "namespace": TemplateNamespace}  # fmt: skip
    return env


def template_messages(conversation: list[dict]) -> list[dict]:
    """The messages as transformers hands them to the template: keys whose value is None dropped, the
    reasoning copied under each of its names."""
    out = []
    for message in conversation:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def read_template(folder: Path, config: dict) -> str | None:
    """The chat template as transformers finds it: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or named templates of which it takes "default")."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class ChatPrompt:
    """A model's chat template and tokenizer, read from its HF folder and applied as transformers applies
    them: the template rendered in transformers' jinja environment with the named special tokens as
    variables, the text tokenized by tokenizer.json without adding special tokens. No torch."""

    def __init__(self, folder: Path):
        import jinja2.meta
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        if not (self.folder / "tokenizer.json").is_file():
            raise InputError(
                f"{self.folder}: no tokenizer.json, so its chat prompts cannot be tokenized without transformers."
            )
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            if (self.folder / name).is_file():
                config |= {
                    k: v
                    for k, v in json.loads((self.folder / name).read_text(encoding="utf-8")).items()
                    if v is not None
                }
        self.special = {k: token_text(config[k]) for k in SPECIAL_TOKENS if token_text(config.get(k)) is not None}
        self.template = read_template(self.folder, config)
        if self.template is None:
            log.warning("%s has no chat template; using ChatML, as llama.cpp does", self.folder)
        environment = jinja_environment()
        source = environment.parse(self.template or CHATML)
        self.compiled = environment.from_string(source)
        # a template that never reads `tools` shows the model none: transformers renders it without them
        self.renders_tools = "tools" in jinja2.meta.find_undeclared_variables(source)
        # llama-cpp-python's chat handler stops at the EOS text too; llama.cpp stops at every end-of-generation token
        self.stop = [self.special["eos_token"]] if "eos_token" in self.special else []

    def text(self, conversation: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """transformers' apply_chat_template(conversation, tokenize=False); `kwargs` are template variables."""
        if not conversation:
            raise InputError("the conversation holds no messages.")
        variables = {**self.special, **kwargs}
        return self.compiled.render(messages=template_messages(conversation), tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **variables)  # fmt: skip

    def ids(self, conversation: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """transformers' apply_chat_template(conversation, tokenize=True): the rendered text's ids, no special
        tokens added (the template writes its own)."""
        return self.tokenizer.encode(
            self.text(conversation, add_generation_prompt, **kwargs), add_special_tokens=False
        ).ids

    def describe(self) -> str:
        return f"the chat template and tokenizer of {self.folder}, as transformers applies them"


class GGUFPrompt:
    """The GGUF's own chat template (ChatML without one, as llama-server does), rendered and tokenized as
    llama-cpp-python's chat handler does: the fallback for a GGUF whose merged model is not at hand."""

    def __init__(self, llm):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        self.template = llm.metadata.get("tokenizer.chat_template")
        vocab = llm._model
        bos, eos = vocab.token_bos(), vocab.token_eos()
        self.formatter = Jinja2ChatFormatter(
            template=self.template or CHATML,
            bos_token=vocab.token_get_text(bos) if bos != -1 else "",
            eos_token=vocab.token_get_text(eos) if eos != -1 else "",
        )
        self.stop = [vocab.token_get_text(eos)] if eos != -1 else []

    def text(self, conversation: list[dict]) -> str:
        return self.formatter(messages=conversation).prompt

    def ids(self, conversation: list[dict]) -> list[int]:
        result = self.formatter(messages=conversation)
        return self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)

    def describe(self) -> str:
        return "the GGUF's own chat template, tokenized by llama.cpp"


def tokenizer_folder(gguf: Path, tokenizer: Path | None = None) -> Path | None:
    """Where a GGUF's prompts are tokenized from: `tokenizer` (--tokenizer), else the merged folder beside it
    in the results layout; None when neither holds a tokenizer.json."""
    folder = tokenizer or merged_folder(gguf)
    if folder is not None and (Path(folder) / "tokenizer.json").is_file():
        return Path(folder)
    if tokenizer is not None:
        raise InputError(f"{tokenizer}: no tokenizer.json (give the merged HF model folder).")
    return None


def chat_prompt_for(gguf: Path, tokenizer: Path | None = None) -> ChatPrompt | None:
    """The ChatPrompt a runtime on `gguf` uses, or None (said in the log) when it has no merged folder."""
    folder = tokenizer_folder(gguf, tokenizer)
    if folder is None:
        log.warning(
            "%s: no merged model folder beside it (%s) and no --tokenizer: prompts are the GGUF's own chat template "
            "tokenized by llama.cpp, which can differ from the ids the model was trained on",
            gguf, merged_folder(gguf) or "not in the results/{model}/ layout",
        )  # fmt: skip
        return None
    return ChatPrompt(folder)


def gguf_runtime_prompt(gguf: Path, llm, tokenizer: Path | None = None) -> ChatPrompt | GGUFPrompt:
    """The prompt path of a runtime that evaluates a GGUF with llama-cpp-python (the chat; `llm` may be
    vocab-only, as the checks load it)."""
    return chat_prompt_for(gguf, tokenizer) or GGUFPrompt(llm)


def hf_chat_ids(tokenizer, conversation: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """transformers' own ids for a conversation: the reference every runtime is held to."""
    return tokenizer.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )


def prompt_text(row: dict) -> str:
    """The prompt of a row for a model without a chat template (plain completion): its turns, a line each."""
    return "".join(m["content"] + "\n" for m in messages(row))


def prompt_ids(tokenizer, row: dict) -> list[int]:
    """The prompt's token ids as transformers builds them: the chat template's, else plain completion's."""
    if tokenizer.chat_template is None:
        return tokenizer(prompt_text(row))["input_ids"]
    return hf_chat_ids(tokenizer, messages(row))


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
