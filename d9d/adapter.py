"""The protocol every adapter layer implements: LoRA on linears, and any later kind (experts, embeddings, DoRA).

Lower layers (``d9d.model_state``, ``d9d.parallel``) and the PEFT-format code handle adapters only through this
protocol, never through concrete layer classes, so they need no ``isinstance`` chain and never import
``d9d.peft``. This module depends on torch alone.
"""

import abc
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["AdapterLayer", "PeftAdapterSpec", "adapter_layers", "adapter_state_keys", "init_adapters_from_base"]


@dataclasses.dataclass(frozen=True)
class PeftAdapterSpec:
    """What one adapter layer is in Hugging Face PEFT's format (``adapter_config.json`` + safetensors).

    Attributes:
        tensors: PEFT's key of each adapter tensor, relative to the layer's qualified name (for example
            ``"lora_A.weight"``), mapped to the layer's own parameter name (``"lora_A"``). PEFT prefixes the full
            key with ``base_model.model.<layer name>.``.
        options: The ``adapter_config.json`` entries that describe this layer (``r``, ``lora_alpha``,
            ``use_rslora``, ``lora_dropout``, ...); layers of one adapter that differ go into PEFT's patterns.
        target_parameters: For adapters on parameters rather than modules (PEFT's ``target_parameters``), the
            targeted parameter names relative to the layer; empty for a module target (PEFT's ``target_modules``).
        to_peft: For a PEFT key whose tensor is laid out differently from the layer's parameter, the function from
            the (full) parameter to PEFT's tensor; keys not listed are stored as they are.
        from_peft: The inverse of ``to_peft``, from PEFT's tensor to the parameter's layout (it also runs on
            ``meta`` tensors, to check shapes before loading).
    """

    tensors: Mapping[str, str]
    options: Mapping[str, Any]
    target_parameters: tuple[str, ...] = ()
    to_peft: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = dataclasses.field(default_factory=dict)
    from_peft: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = dataclasses.field(default_factory=dict)


class AdapterLayer(nn.Module, abc.ABC):
    """A module that wraps a frozen base module and adds trainable adapter parameters to it.

    The base module stays reachable as ``self.base`` with its original parameter names, so a checkpoint of the
    original model loads through a rename (``X.weight -> X.base.weight``).
    """

    base: nn.Module

    @abc.abstractmethod
    def adapter_parameter_names(self) -> tuple[str, ...]:
        """Names of this layer's own (non-recursive) parameters that a pretrained checkpoint lacks."""

    @abc.abstractmethod
    def reset_adapter_parameters(self) -> None:
        """Initializes the adapter parameters; also run after a meta-device model is materialized.

        ``d9d.parallel.materialize_model`` calls it on full (unsharded) tensors and keeps each rank's shard, so the
        initialization must depend only on the parameters' shapes and torch's RNG.
        """

    def init_from_base(self) -> None:
        """Initializes the adapter parameters that derive from the base weights (DoRA's magnitude); most have none.

        Runs when the base weights hold their pretrained values: a layer wrapping a loaded module does it on
        construction, and a meta-initialized model needs :func:`init_adapters_from_base` after
        ``load_model_state``. Sharded layers initialize shard-locally. The default does nothing.
        """

    @abc.abstractmethod
    def merge_into_base(self) -> nn.Module:
        """Folds the adapter into the base weights in place (shard-locally when sharded); returns the base module.

        After this the layer is spent: the caller puts the returned module back where the layer was.
        """

    @abc.abstractmethod
    def peft_spec(self) -> PeftAdapterSpec:
        """This layer in PEFT's format: its tensor keys and its ``adapter_config.json`` entries."""

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """The adapter parameters themselves, in :meth:`adapter_parameter_names` order."""
        for name in self.adapter_parameter_names():
            yield getattr(self, name)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_state_keys(model: nn.Module) -> frozenset[str]:
    """State keys of every adapter parameter of ``model``: a pretrained checkpoint lacks them."""
    return frozenset(
        f"{name}.{p}" if name else p for name, layer in adapter_layers(model).items()
        for p in layer.adapter_parameter_names()
    )


def init_adapters_from_base(model: nn.Module) -> None:
    """Runs :meth:`AdapterLayer.init_from_base` on every adapter layer of ``model``.

    Call it once after the pretrained base weights are loaded into a model built on ``meta`` (``materialize_model``
    then ``load_model_state``), and before loading trained adapters: DoRA's magnitude starts as the row norms of
    the loaded weights. Until then a DoRA layer's magnitude is NaN, so forgetting the call cannot go unnoticed. On a
    sharded model every rank calls it (no communication beyond gathering the small adapters).
    """
    for layer in adapter_layers(model).values():
        layer.init_from_base()
