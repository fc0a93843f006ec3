"""Adapters into their base, exactly as peft's merge_and_unload makes it.

`folders` finds the weights, tokenizer and JSON files of the base and adapter folders; `formats` tells a peft
adapter from an mlx-lm one, names every other format (refused) and has peft validate a peft config; `adapter`
is what an adapter does to the base, as every plan states it; `plan` checks every adapter against the base
from headers before any weight is read; `lora` classifies every LoraConfig field and holds LoRA's variants;
`tuners/` holds every other tuner peft merges (one module each) and `tuned` plans them; `merge` streams the
merge a tensor at a time; `runtime_lora` says which adapters can run at run time instead, and makes their
unmerged base.
"""
