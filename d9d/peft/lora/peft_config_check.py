"""Which ``adapter_config.json`` options of a PEFT LoRA adapter d9d reproduces exactly, and which it refuses.

An adapter must never load into outputs that differ from ``PeftModel.from_pretrained``'s. Every field of the
installed PEFT's ``LoraConfig`` (0.21) is listed here once, in one of three groups: fields d9d honours (the rank,
scale, DoRA, targeting and ``modules_to_save``, checked against the model by ``load_peft_adapter``), fields that
cannot change the loaded model's outputs (metadata, training-only settings), and fields that change the math or the
base weights, which are refused unless they hold their plain-LoRA value. A field d9d does not know is refused when
it is set, since it may change the outputs.
"""

from typing import Any

__all__ = ["refused_peft_options"]

# Handled by load_peft_adapter: shapes and keys (r, rank_pattern, targeting), the scale (lora_alpha, alpha_pattern,
# use_rslora), DoRA (use_dora), fully-tuned modules (modules_to_save) and PEFT's identity (peft_type).
HONOURED = frozenset({
    "peft_type", "r", "rank_pattern", "lora_alpha", "alpha_pattern", "use_rslora", "use_dora", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "target_parameters",
})

# Cannot change the outputs of a loaded adapter: metadata, dropout (training only), where PEFT keeps tensors at run
# time, and the configs of inits whose result the weights file overwrites.
NO_EFFECT = frozenset({
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "lora_dropout", "runtime_config", "megatron_core",
})

# init_lora_weights values that only initialize lora_A / lora_B (the file then overwrites them). Every other value
# is refused: pissa, olora, corda, loftq and lora_ga rewrite the base weights, so the adapter only works on a base
# that no longer is the pretrained checkpoint; eva and mica are data- or weight-derived inits refused conservatively.
PLAIN_INITS = (True, False, "gaussian", "orthogonal")

# Fields that change the math (or the model's structure) when set, with the value that leaves plain LoRA. The
# config of an init (loftq_config, ...) matters only with that init, refused through init_lora_weights.
PLAIN_VALUES: dict[str, tuple[Any, ...]] = {
    "fan_in_fan_out": (False,),  # the weights are stored transposed (Conv1D layers), which d9d does not wrap
    "bias": ("none",),  # trains and saves biases too
    "lora_bias": (False,),  # a bias on lora_B
    "megatron_config": (None,),  # Megatron's parallel layers
    "trainable_token_indices": (None, {}, []),  # extra trained token embeddings
    "velora_config": (None,),  # VeLoRA's compressed activations
    "alora_invocation_tokens": (None,),  # activated LoRA: the adapter acts only after the invocation tokens
    "use_qalora": (False,),  # QA-LoRA pools the input over groups
    "monteclora_config": (None,),  # MonteCLoRA's stochastic adapters
    "layer_replication": (None, []),  # duplicates decoder layers
    "use_bdlora": (None, False),  # block-diagonal LoRA
    "arrow_config": (None,),  # routing between several LoRAs
    "kasa_config": (None,),  # KaSA's singular-value adapters
    "ensure_weight_tying": (False,),  # ties adapters of tied embeddings, which d9d refuses
}
INIT_CONFIGS = frozenset({"loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size"})


def _is_plain(value: Any, plain: tuple[Any, ...]) -> bool:
    # `True == 1` in Python: compare types too so that 1 is not taken for True.
    return any(value == p and type(value) is type(p) for p in plain)


def refused_peft_options(config: dict[str, Any]) -> list[str]:
    """The options of an ``adapter_config.json`` that d9d cannot reproduce exactly, each with the reason.

    Args:
        config: The parsed ``adapter_config.json`` of a LoRA adapter.

    Returns:
        One ``"<field>=<value>: <why>"`` entry per refused option; empty when the adapter loads exactly.
    """
    refused = []
    init = config.get("init_lora_weights", True)
    if not _is_plain(init, PLAIN_INITS):
        refused.append(f"init_lora_weights={init!r}: only {list(PLAIN_INITS)} load exactly (pissa, olora, corda, "
                       "loftq and lora_ga change the base weights; eva and mica are refused too)")
    for field, plain in PLAIN_VALUES.items():
        if field in config and not _is_plain(config[field], plain):
            refused.append(f"{field}={config[field]!r}: changes the outputs and d9d does not implement it "
                           f"(expected {plain[0]!r})")
    known = HONOURED | NO_EFFECT | PLAIN_VALUES.keys() | INIT_CONFIGS | {"init_lora_weights"}
    for field, value in config.items():
        if field not in known and value not in (None, False, {}, []):
            refused.append(f"{field}={value!r}: unknown to d9d, so it may change the outputs")
    return refused
