"""LoRA adapters in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A d9d LoRA layer at qualified name ``X`` (``X.lora_A`` is r x in, ``X.lora_B`` is out x r) is PEFT's
``base_model.model.X.lora_A.weight`` / ``...lora_B.weight`` with the same shapes and the same scale
(``lora_alpha / r``, or ``/ sqrt(r)`` with ``use_rslora``). Layers of one stack may differ in rank and scale:
PEFT's ``rank_pattern`` / ``alpha_pattern`` carry the exceptions. DoRA layers add ``...lora_magnitude_vector``
(``use_dora``); embeddings are ``...lora_embedding_A`` / ``...lora_embedding_B``. Import refuses, by name, every
``adapter_config.json`` option that d9d cannot reproduce exactly (``peft_config_check``). Fully-tuned modules that
PEFT can express go into ``modules_to_save`` (PEFT stores their weights as ``base_model.model.<module>.<param>``).

Both directions work on FSDP2-sharded models: export gathers the (small) adapters, import keeps each rank's shard.
"""

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from torch import nn

from d9d.adapter import AdapterLayer, PeftAdapterSpec, adapter_layers
from d9d.dtensor import full_tensor
from d9d.model_state.io import load_model_state
from d9d.model_state.io.atomic import atomic_directory, check_destination
from d9d.model_state.io.layout import read_header
from d9d.model_state.mapper import ModelStateMapper, ModelStateMapperParallel, StateGroup
from d9d.model_state.mapper.leaf import ModelStateMapperRename
from d9d.parallel.process_group import barrier, is_main_rank
from d9d.peft.lora.peft_config_check import refused_peft_options

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "load_peft_adapter",
    "peft_adapter_state",
    "read_adapter_config",
    "save_peft_adapter",
]


def _modules_to_save(model: nn.Module, lora: dict[str, AdapterLayer]) -> dict[str, nn.Module]:
    """Modules whose parameters all train, outside LoRA layers: PEFT's ``modules_to_save``.

    Raises:
        ValueError: If a trainable non-adapter parameter cannot be expressed (it lives inside a LoRA layer, or its
            module also holds frozen parameters); the message names it.
    """
    inside_lora = {id(p) for m in lora.values() for p in m.adapter_parameters()}
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        direct = dict(module.named_parameters(recurse=False))
        trainable = [n for n, p in direct.items() if p.requires_grad and id(p) not in inside_lora]
        if not trainable:
            continue
        qualified = [f"{name}.{n}" if name else n for n in trainable]
        if any(name == lname or name.startswith(lname + ".") for lname in lora):
            raise ValueError(
                f"trainable parameter(s) {qualified} live inside a LoRA layer; PEFT's format cannot save a LoRA "
                "layer's base weights. Do not full-tune modules that LoRA wraps, or export without modules_to_save"
            )
        frozen = [n for n, p in direct.items() if not p.requires_grad]
        if frozen or not name:
            raise ValueError(
                f"module {name or '<root>'!r} trains {trainable} but not {frozen}; PEFT's modules_to_save trains "
                "whole modules"
            )
        chosen[name] = module
    return chosen


def peft_adapter_state(
    model: nn.Module, include_modules_to_save: bool = True
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The adapter tensors under PEFT's keys (full tensors) and the ``modules_to_save`` names.

    A collective on sharded models: every rank must call it; every rank gets the full (small) tensors.

    Raises:
        ValueError: If the model has no LoRA layer, or a trainable parameter cannot be expressed (see above).
    """
    lora = adapter_layers(model)
    if not lora:
        raise ValueError("the model has no LoRA layer to export")
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora.items():
        spec = layer.peft_spec()
        for key, param_name in spec.tensors.items():
            tensor = full_tensor(getattr(layer, param_name)).detach()
            if key in spec.to_peft:
                tensor = spec.to_peft[key](tensor)
            state[f"{PREFIX}{name}.{key}"] = tensor.cpu().contiguous()
    saved = _modules_to_save(model, lora) if include_modules_to_save else {}
    for name, module in saved.items():
        for pname, param in module.named_parameters(recurse=False):
            state[f"{PREFIX}{name}.{pname}"] = full_tensor(param).detach().cpu().contiguous()
    return state, sorted(saved)


def _adapter_config(
    lora: dict[str, AdapterLayer],
    modules_to_save: list[str],
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> dict:
    specs = {n: m.peft_spec() for n, m in lora.items()}
    options = {n: spec.options for n, spec in specs.items()}
    target_modules = sorted(n for n, spec in specs.items() if not spec.target_parameters)
    target_parameters = sorted(f"{n}.{p}" for n, spec in specs.items() for p in spec.target_parameters)
    rslora = {o["use_rslora"] for o in options.values()}
    if len(rslora) > 1:
        raise ValueError("PEFT's format has one use_rslora for all layers; the stack mixes rsLoRA and plain LoRA")
    use_rslora = rslora.pop()
    dora = {n: bool(o.get("use_dora", False)) for n, o in options.items()}
    if len(set(dora.values())) > 1:
        plain = sorted(n for n, d in dora.items() if not d)
        raise ValueError(f"PEFT's format has one use_dora for all layers; the stack mixes DoRA and plain LoRA layers "
                         f"(plain: {plain[:3]}{' ...' if len(plain) > 3 else ''})")
    use_dora = any(dora.values())
    alpha = {n: o["lora_alpha"] for n, o in options.items()}
    ranks = {n: o["r"] for n, o in options.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alpha.values()).most_common(1)[0][0]
    dropout = Counter(o["lora_dropout"] for o in options.values()).most_common(1)[0][0]
    if target_parameters:
        # PEFT's ParamWrapper (target_parameters) refuses lora_dropout != 0 even for inference, where dropout
        # changes nothing; the trained adapters are the same either way.
        dropout = 0.0
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        # PEFT wants None, not [], for a kind of target the adapter does not use.
        "target_modules": target_modules or None,
        "target_parameters": target_parameters or None,
        # PEFT matches pattern keys as regexes against module names: escape the names.
        "rank_pattern": {re.escape(k): ranks[n] for n, k in _pattern_keys(specs) if ranks[n] != r},
        "alpha_pattern": {re.escape(k): alpha[n] for n, k in _pattern_keys(specs) if alpha[n] != lora_alpha},
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": use_dora,
        "revision": None,
    }


def save_peft_adapter(
    model: nn.Module,
    dest_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    include_modules_to_save: bool = True,
) -> Path:
    """Writes the model's LoRA adapters in PEFT's format, atomically (a temporary folder renamed when complete).

    On a sharded model every rank must call it (the adapters are gathered); rank 0 writes.

    Args:
        model: A model with d9d adapter layers (the model PEFT will wrap, so the names match).
        dest_dir: The adapter folder (replaced if it exists).
        base_model_name_or_path: Recorded for ``PeftModel.from_pretrained`` users.
        task_type: PEFT's task type, e.g. ``"CAUSAL_LM"``; ``None`` for a plain ``PeftModel``.
        include_modules_to_save: Save fully-tuned modules as PEFT ``modules_to_save``.

    Returns:
        ``dest_dir`` as a ``Path``.

    Raises:
        ValueError: If the model cannot be expressed in PEFT's format (the message names the layer or parameter), or
            ``dest_dir`` is an existing file or holds the working directory.
    """
    from safetensors.torch import save_file

    dest = Path(dest_dir)
    check_destination(dest)  # on every rank, before the gather: rank 0 alone raising would leave the others waiting
    state, modules_to_save = peft_adapter_state(model, include_modules_to_save)
    lora = adapter_layers(model)
    config = _adapter_config(lora, modules_to_save, base_model_name_or_path, task_type)
    for target in modules_to_save:
        clashes = [n for n in _peft_modules_to_save(model, [target]) if n != target]
        if clashes:
            raise ValueError(f"modules_to_save entry {target!r} would also match {clashes[:3]} in PEFT (suffix match)")
    if is_main_rank():
        with atomic_directory(dest) as tmp:
            save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    barrier()
    return dest


def _peft_modules_to_save(model: nn.Module, entries: list[str]) -> list[str]:
    """The names of the modules that PEFT saves for the ``modules_to_save`` entries.

    PEFT (``peft.utils.other._set_trainable``) wraps every module whose qualified name ends with an entry, as a
    plain string suffix: ``"norm"`` selects ``model.norm`` and also ``model.layers.0.input_layernorm``. The adapter
    file then holds each selected module's parameters under ``base_model.model.<module>.<param>``.
    """
    return [name for name, _ in model.named_modules() if name and any(name.endswith(e) for e in entries)]


def _pattern_keys(specs: dict[str, PeftAdapterSpec]) -> list[tuple[str, str]]:
    """(layer name, the name PEFT matches its rank/alpha pattern against): the module for a module target, each
    ``<module>.<parameter>`` for a parameter target."""
    return [(n, f"{n}.{p}") for n, spec in specs.items() for p in spec.target_parameters] + [
        (n, n) for n, spec in specs.items() if not spec.target_parameters]


def _peft_scale(config: dict, name: str, r: int) -> float:
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            alpha = value
            break
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def read_adapter_config(src_dir: str | os.PathLike) -> dict:
    """The ``adapter_config.json`` of a PEFT adapter folder, checked to be a plain LoRA config d9d can load.

    Raises:
        ValueError: If the file is missing, not UTF-8 JSON, not a JSON object, or not a plain LoRA adapter; the
            message names the file.
    """
    config_path = Path(src_dir) / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ValueError(f"PEFT adapter folder {str(src_dir)!r} has no {ADAPTER_CONFIG}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters load")
    refused = refused_peft_options(config)
    if refused:
        raise ValueError(f"{config_path}: option(s) that d9d cannot reproduce exactly: {'; '.join(refused)}")
    for key in ("alpha_pattern", "rank_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ValueError(f"{config_path}: {key} must be an object, got {type(config[key]).__name__}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise ValueError(f"{config_path}: lora_alpha must be a number, got {alpha!r}")
    if not isinstance(config.get("modules_to_save") or [], list):
        raise ValueError(f"{config_path}: modules_to_save must be a list, got "
                         f"{type(config['modules_to_save']).__name__}")
    return config


def load_peft_adapter(model: nn.Module, src_dir: str | os.PathLike, check_scale: bool = True) -> None:
    """Loads a PEFT-format LoRA adapter into a d9d LoRA-injected model (sharded or not), in place.

    Every LoRA layer of the model must get both matrices from the file, and every tensor of the file must land
    in the model, with the same shape. The base weights are not touched. The tensors go through
    :func:`d9d.model_state.io.load_model_state` with a rename mapper (PEFT key -> model key), so a sharded model
    keeps each rank's shard without communicating. Call it on every rank of a sharded model.

    Args:
        model: The injected model; its LoRA layers must sit at the names the adapter was trained on.
        src_dir: Folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        check_scale: Refuse adapters whose ``lora_alpha`` / ``r`` / ``use_rslora`` give a different scale than
            the model's LoRA layers (the outputs would silently differ).

    Raises:
        ValueError: If the files are missing, the adapter is not plain LoRA, or keys, shapes or scales disagree;
            the message names the file, key or layer. Nothing is loaded then.
    """
    src = Path(src_dir)
    config_path, weights_path = src / ADAPTER_CONFIG, src / ADAPTER_WEIGHTS
    config = read_adapter_config(src)
    if not weights_path.is_file():
        raise ValueError(f"PEFT adapter folder {str(src)!r} has no {weights_path.name}")
    lora = adapter_layers(model)
    use_dora = bool(config.get("use_dora", False))
    for name, layer in lora.items():
        if bool(layer.peft_spec().options.get("use_dora", False)) != use_dora:
            raise ValueError(f"{config_path}: use_dora={use_dora} but the model's layer {name!r} is "
                             f"{type(layer).__name__} (inject with LoRAParameters(use_dora={use_dora}))")
    header = read_header(weights_path)
    sources = _peft_sources(model, lora, config.get("modules_to_save") or [], header.keys())
    missing = sorted(sources.keys() - header.keys())
    unexpected = sorted(header.keys() - sources.keys())
    if missing:
        raise ValueError(f"{weights_path}: missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} for "
                         f"the model's LoRA layers")
    if unexpected:
        raise ValueError(f"{weights_path}: unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
                         " that match no LoRA layer or modules_to_save parameter of the model")
    params = dict(model.named_parameters())
    for key, (target, from_peft) in sources.items():
        shape, model_shape = tuple(header[key][0]), tuple(params[target].shape)
        try:
            converted = tuple(from_peft(torch.empty(shape, device="meta")).shape) if from_peft else shape
        except RuntimeError:
            converted = None
        if converted != model_shape:
            raise ValueError(f"{weights_path}: {key!r} has shape {shape}, which does not fit the model's parameter "
                             f"{target!r} of shape {model_shape}")
    if check_scale:
        for name, layer in lora.items():
            ours = layer.peft_spec().options
            ours_scale = ours["lora_alpha"] / (math.sqrt(ours["r"]) if ours["use_rslora"] else ours["r"])
            # PEFT looks alpha_pattern up per target: the module, or each targeted parameter of it.
            targets = [f"{name}.{p}" for p in layer.peft_spec().target_parameters] or [name]
            for target in targets:
                scale = _peft_scale(config, target, ours["r"])
                if not math.isclose(scale, ours_scale, rel_tol=1e-6):
                    raise ValueError(f"{config_path}: LoRA layer {target!r} has scale {scale:g} in the adapter but "
                                     f"{ours_scale:g} in the model (check lora_alpha, alpha_pattern, r and use_rslora)")
    renames = {key: target for key, (target, from_peft) in sources.items() if from_peft is None}
    relayouts = [_FromPeftLayout(key, target, from_peft) for key, (target, from_peft) in sources.items() if from_peft]
    mapper = ModelStateMapperParallel([ModelStateMapperRename(renames), *relayouts])
    load_model_state(weights_path, mapper, "cpu", model, show_progress=False,
                     only_keys=[target for target, _ in sources.values()])


_Relayout = Callable[[torch.Tensor], torch.Tensor]


def _peft_sources(model: nn.Module, lora: dict[str, AdapterLayer], modules_to_save: list[str],
                  file_keys: Collection[str]) -> dict[str, tuple[str, _Relayout | None]]:
    """PEFT's key of each adapter tensor and ``modules_to_save`` parameter -> the model's parameter name and the
    change of layout from PEFT's tensor to it (``None``: the same layout)."""
    sources: dict[str, tuple[str, _Relayout | None]] = {}
    for name, layer in lora.items():
        spec = layer.peft_spec()
        for key, param_name in spec.tensors.items():
            sources[f"{PREFIX}{name}.{key}"] = (f"{name}.{param_name}" if name else param_name,
                                                spec.from_peft.get(key))
        # PEFT's save_embedding_layers also stores the base weights of adapted embeddings (and LM heads), and
        # PeftModel.from_pretrained loads them into the base layer: so does d9d.
        base_key = f"{PREFIX}{name}.base_layer.weight"
        if base_key in file_keys:
            sources[base_key] = (f"{name}.base.weight", None)
    saved_modules = _peft_modules_to_save(model, modules_to_save)
    for pname, _ in model.named_parameters():
        if any(pname.startswith(module + ".") for module in saved_modules):
            sources[f"{PREFIX}{pname}"] = (pname, None)
    return sources


class _FromPeftLayout(ModelStateMapper):
    """Renames one PEFT key to its model key and changes the tensor's layout to the parameter's."""

    def __init__(self, source: str, target: str, relayout: _Relayout):
        self._source, self._target, self._relayout = source, target, relayout

    def state_dependency_groups(self) -> frozenset[StateGroup]:
        return frozenset([StateGroup(inputs=frozenset([self._source]), outputs=frozenset([self._target]))])

    def apply(self, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._target: self._relayout(group[self._source])}
