"""One quantized base, several GGUF LoRA adapters: which adapters each served model name applies.

`scripts.serve BASE.gguf --lora NAME=FILE[:SCALE] ...` serves the base as `{model}-{qtype}` and
each NAME as `{model}-{qtype}+NAME`. llama-server loads every adapter file once, applied to
nothing (`--lora-init-without-apply`); each request's `model` field becomes llama-server's
per-request `lora` field, listing every loaded adapter with its scale for that model (0 for the
others), so clients of different adapters are served at the same time from one copy of the base.
A NAME given more than once is a stack: its adapters are applied together, each at its scale.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from cpuforge.errors import InputError

log = logging.getLogger(__name__)


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_scaled_file(text: str, flag: str = "--lora") -> tuple[Path, float]:
    """`FILE[:SCALE]` as a path and a scale (1.0 unless given)."""
    path, _, scale = text.rpartition(":")
    if not path:
        return Path(text), 1.0
    try:
        return Path(path), float(scale)
    except ValueError:
        raise InputError(f"{flag} {text}: the scale after the last `:` must be a number, got {scale!r}.") from None


def parse_named_lora(text: str) -> tuple[str, Path, float]:
    """`NAME=FILE[:SCALE]` of scripts.serve's --lora."""
    name, sep, rest = text.partition("=")
    if not sep or not NAME.fullmatch(name):
        raise InputError(f"--lora {text}: give NAME=FILE[:SCALE], NAME being letters, digits, `.`, `_` or `-`.")
    return name, *parse_scaled_file(rest)


@dataclass
class ModelTable:
    """The served model names: the base alone, and base + each named adapter (or stack)."""

    base: str
    files: list[Path] = field(default_factory=list)  # llama-server's adapter ids are places in this list
    models: dict[str, dict[int, float]] = field(default_factory=dict)  # served name -> {adapter id: scale}

    @classmethod
    def build(cls, base: str, loras: list[tuple[str, Path, float]]) -> ModelTable:
        table = cls(base, models={base: {}})
        for name, path, scale in loras:
            if not path.is_file():
                raise InputError(f"--lora {name}={path}: file not found.")
            path = path.resolve()
            if path not in table.files:
                table.files.append(path)
            table.models.setdefault(f"{base}+{name}", {})[table.files.index(path)] = scale
        return table

    def __contains__(self, model) -> bool:
        # a request's `model` may be any JSON value; only a name it serves is in
        return isinstance(model, str) and model in self.models

    def names(self) -> list[str]:
        return list(self.models)

    def server_args(self) -> list[str]:
        """llama-server's flags: every adapter loaded once, none applied until a request asks for it, and no
        prompt cache in RAM: it keeps a prompt's state by its tokens alone, so a prompt read under one adapter
        would be handed to a request for another (each slot's own cache stays; llama-server clears it when a
        slot's adapters change)."""
        if not self.files:
            return []
        return [*(a for f in self.files for a in ("--lora", str(f))), "--lora-init-without-apply", "--cache-ram", "0"]

    def lora_field(self, model: str) -> list[dict]:
        """llama-server's per-request `lora`: every loaded adapter, at this model's scale or 0."""
        scales = self.models[model]
        return [{"id": i, "scale": scales.get(i, 0.0)} for i in range(len(self.files))]

    def with_lora(self, body: dict) -> dict:
        """The request with the model's `lora` field when adapters are loaded (a client's own `lora` is
        replaced: the model name alone picks the adapters)."""
        if not self.files:
            return body
        return {**body, "lora": self.lora_field(body.get("model", self.base))}

    def request_body(self, body: dict, raw: bytes) -> bytes:
        """The body to forward: as sent when no adapter is loaded, else with the model's `lora` field."""
        return raw if not self.files else json.dumps(self.with_lora(body)).encode()
