"""What an adapter given to the merge is, from its files: a peft adapter folder whose adapter_config.json peft's own
config class accepts."""

from __future__ import annotations

import warnings
from pathlib import Path

from cpuforge.errors import InputError


def check_with_peft(adapters: list[Path]) -> None:
    """Load each adapter's adapter_config.json with peft's own config class, as PeftModel.from_pretrained does: a
    config peft refuses (its __post_init__ checks, such as a regex target_modules with layers_to_transform) is
    refused in peft's words. Run after the plan (cpuforge.merge.plan.check_inputs), whose field checks name the
    fields peft would only warn about, by the start-up check and the merge: not by every step that plans, since
    importing peft takes 300 MiB and seconds."""
    for folder in adapters:
        from peft import PeftConfig

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unknown or run-time keys: the plan's field checks name them
                PeftConfig.from_pretrained(str(folder))
        except (ValueError, TypeError) as e:
            said = str(e).strip()
            raise InputError(
                f"{folder / 'adapter_config.json'}: peft refuses this config: {said}{'' if said.endswith('.') else '.'}"
            ) from None
