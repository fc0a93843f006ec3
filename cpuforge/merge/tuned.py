"""The plan of an adapter of a tuner other than LoRA (IA3, LoHa, LoKr, AdaLoRA, VeRA, …; their math is in
cpuforge.merge.tuners): its config checked field by field by the tuner, its tensors grouped by module, each
module's merge tried on shapes alone, all before any weight is read."""

from __future__ import annotations

from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.merge.adapter import PREFIX, Adapter, Tuned, check_selected, check_shape, layer_linears, plan_whole_tensor
from cpuforge.merge.folders import adapter_shapes, adapter_weights_file


def plan_tuned(folder: Path, config: dict, shapes: dict[str, list[int]], files: dict[str, Path]) -> Adapter:
    """An adapter of a tuner other than LoRA: its config checked field by field by the tuner, its tensors grouped
    by module, and each module's merge tried on shapes alone (torch's meta tensors), so that an adapter made for
    another base fails here, from the headers."""
    from cpuforge.merge.tuners import REFUSED as REFUSED_TUNERS, TUNERS

    config_path, peft_type = folder / "adapter_config.json", config.get("peft_type")
    if peft_type in REFUSED_TUNERS:
        raise InputError(f"{config_path}: peft_type {peft_type!r} cannot be merged: {REFUSED_TUNERS[peft_type]}.")
    if peft_type not in TUNERS:
        raise InputError(f"{config_path}: peft_type {peft_type!r} is not a tuner peft 0.21.2 has.")
    tuner = TUNERS[peft_type]
    tuner.check_config(config_path, config)
    weights = adapter_weights_file(folder)
    tensors = adapter_shapes(weights)
    adapter = Adapter(folder, weights, tuner=peft_type, config=config)
    modules: dict[str, dict[str, str]] = {}
    for name, shape in sorted(tensors.items()):
        suffix = next((s for s in tuner.suffixes if name.endswith("." + s)), None)
        shared = next((s for s in tuner.shared if name == f"base_model.{s}"), None)
        if shared:
            adapter.shared[shared] = name
        elif suffix:
            modules.setdefault(name.removeprefix(PREFIX).removesuffix("." + suffix), {})[suffix] = name
        elif ".original_module." not in name:
            plan_whole_tensor(adapter, name, shape, shapes, files)
    adapter.module_shapes = [tuple(shapes[f"{m}.weight"]) for m in modules if f"{m}.weight" in shapes]
    missing = [s for s in tuner.shared if s not in adapter.shared]
    if modules and missing and tuner.make_shared is None:
        raise InputError(f"{weights}: has no shared tensor(s) {', '.join(f'base_model.{s}' for s in missing)}.")
    for module, parts in sorted(modules.items()):
        missing = [s for s in tuner.suffixes if s not in parts and s not in tuner.optional]
        if missing:
            raise InputError(f"{weights}: module {module} has no {', '.join(missing)} tensor(s).")
        target = f"{module}.weight"
        if target not in shapes:
            raise InputError(
                f"{weights}: tensor {next(iter(parts.values()))} adapts {target}, which the base model does not have."
            )
        if config.get("target_modules") is not None:  # none: the tuner's own default, which the tensors then name
            check_selected(config_path, config, module, layer_linears(shapes), weights, next(iter(parts.values())))
        try_on_shapes(adapter, tuner, module, parts, tensors, shapes, files)
        adapter.tuned.append(Tuned(target, module, parts))
        if tuner.needs_bias and f"{module}.bias" not in shapes:
            raise InputError(
                f"{weights}: the {peft_type} tensors of {module} change its bias, but the base has no "
                f"{module}.bias; peft refuses this merge too."
            )
        if tuner.merged_bias is not None and f"{module}.bias" in shapes:
            adapter.tuned.append(Tuned(f"{module}.bias", module, parts, bias=True))
    if not adapter.tuned and not adapter.replace:
        raise InputError(f"{weights}: holds no {peft_type} or whole tensors.")
    return adapter


def try_on_shapes(adapter: Adapter, tuner, module: str, parts: dict, tensors: dict, shapes: dict, files: dict) -> None:
    """The tuner's merge run on meta tensors (shapes, no data): the merged weight must keep the base's shape."""
    import torch

    def meta(shape):
        return torch.empty(shape, device="meta")

    target = f"{module}.weight"
    shared = {s: meta(tensors[n]) for s, n in adapter.shared.items()}
    if len(shared) < len(tuner.shared):
        shared = {s: meta(t.shape) for s, t in tuner.make_shared(adapter.config, adapter.module_shapes).items()}
    try:
        merged = tuner.merged_weight(
            meta(shapes[target]), {s: meta(tensors[n]) for s, n in parts.items()}, adapter.config, module, shared
        )
    except NotImplementedError:
        return  # an operation meta tensors lack: the merge itself checks the shapes
    except RuntimeError as e:
        if "meta" in str(e):
            return  # the tuner makes real tensors of its own (FourierFT's seeded positions): checked at the merge
        raise InputError(
            f"{adapter.weights}: the {adapter.tuner} tensors of {module} do not fit {target} of shape {shapes[target]} "
            f"({e}); this adapter was made for another base model."
        ) from None
    except (ValueError, IndexError) as e:
        raise InputError(
            f"{adapter.weights}: the {adapter.tuner} tensors of {module} do not fit {target} of shape {shapes[target]} "
            f"({e}); this adapter was made for another base model."
        ) from None
    if list(merged.shape) != shapes[target]:
        check_shape(adapter.weights, next(iter(parts.values())), target, list(merged.shape), shapes, files)
