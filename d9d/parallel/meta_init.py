"""Building a model without allocating its parameters, then materializing it (after sharding, only the shards)."""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from d9d.adapter import AdapterLayer, adapter_layers
from d9d.dtensor import is_meta, local_part


@contextlib.contextmanager
def init_empty_parameters() -> Iterator[None]:
    """Within this context, modules register their parameters on the ``meta`` device; buffers stay real.

    Parameters are the memory (a 7B model's weights); buffers are small and often computed in ``__init__`` and
    never saved (a rotary embedding's ``inv_freq``, BERT's ``position_ids``), so a checkpoint cannot restore them
    and ``to_empty`` would leave garbage. Keeping buffers real and letting :func:`materialize_model` carry them
    over avoids that. Works for any ``nn.Module`` (Hugging Face models included) because every parameter goes
    through ``nn.Module.register_parameter``; the same idea as ``accelerate.init_empty_weights(include_buffers=False)``.

    Example:
        >>> with init_empty_parameters():
        ...     model = MyModel(config)   # parameters on meta, buffers real
        >>> mapper = inject_peft_and_freeze(method, model)
        >>> shard_model(model, MyBlock)
        >>> materialize_model(model, torch.device("cpu"))
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            param_cls = type(param)
            attrs = dict(param.__dict__)
            module._parameters[name] = param_cls(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name].__dict__.update(attrs)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@torch.no_grad()
def materialize_model(model: nn.Module, device: torch.device | str, allow_uninitialized_buffers: bool = False) -> None:
    """Allocates ``model``'s meta tensors on ``device`` (only the local shards of a sharded model), in place.

    Parameters come back uninitialized, to be filled by ``d9d.model_state.io.load_model_state``; LoRA adapters,
    which no pretrained checkpoint holds, are re-initialized (``AdapterLayer.reset_adapter_parameters``). For sharded
    adapters the initialization runs on the full (small, r x features) tensors and each rank keeps its shard, so
    the adapters do not depend on the world size as long as every rank seeded its RNG identically. Buffers that
    were real (see :func:`init_empty_parameters`) keep their values.

    Args:
        model: The model, possibly sharded by ``d9d.parallel.shard_model``.
        device: Where to allocate.
        allow_uninitialized_buffers: Accept non-persistent buffers that are on ``meta`` (no checkpoint restores
            them, so they would hold garbage); by default they are an error.

    Raises:
        ValueError: If a parameter is not on ``meta`` (``to_empty`` would wipe its values), or a non-persistent
            buffer is on ``meta`` and ``allow_uninitialized_buffers`` is False; the message names it.
    """
    real_params = [name for name, p in model.named_parameters() if not is_meta(p)]
    if real_params:
        raise ValueError(f"parameter(s) {real_params[:5]} are not on the meta device; materialize_model would "
                         "overwrite them with uninitialized memory (build the model under init_empty_parameters())")
    real_buffers: dict[str, torch.Tensor] = {}
    garbage: list[str] = []
    for module_name, module in model.named_modules():
        for buffer_name, buffer in module.named_buffers(recurse=False):
            name = f"{module_name}.{buffer_name}" if module_name else buffer_name
            if buffer.device.type != "meta":
                real_buffers[name] = buffer
            elif buffer_name in module._non_persistent_buffers_set:
                garbage.append(name)
    if garbage and not allow_uninitialized_buffers:
        raise ValueError(
            f"non-persistent buffer(s) {garbage[:5]} are on the meta device; no checkpoint restores them. Build the "
            "model under d9d.parallel.init_empty_parameters() so buffers stay real, or pass "
            "allow_uninitialized_buffers=True and initialize them yourself"
        )
    model.to_empty(device=device)
    for name, old in real_buffers.items():
        model.get_buffer(name).copy_(old)
    for layer in adapter_layers(model).values():
        _reset_adapters_unsharded(layer)


def _reset_adapters_unsharded(layer: AdapterLayer) -> None:
    """``layer.reset_adapter_parameters()`` as if unsharded: init full tensors, keep this rank's shard of each."""
    sharded = {n: p for n, p in layer.named_parameters(recurse=False) if isinstance(p, DTensor)}
    if not sharded:
        layer.reset_adapter_parameters()
        return
    full = {n: nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device)) for n, p in
            sharded.items()}
    try:
        layer._parameters.update(full)  # briefly swap in full tensors so the layer's own init runs on them
        layer.reset_adapter_parameters()
    finally:
        layer._parameters.update(sharded)
    for n, p in sharded.items():
        p.to_local().copy_(local_part(full[n].detach(), p))
