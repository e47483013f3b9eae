"""After training: the PEFT-format adapter, the merged Hugging Face checkpoint, and the check that both reproduce
the adapted model."""

import dataclasses
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from d9d.adapter import adapter_layers
from d9d.finetune.model import BuiltModel, ModelSource, auto_model_class
from d9d.model_state.io import save_model_state
from d9d.parallel import barrier, is_main_rank
from d9d.peft import merge_peft
from d9d.peft.lora.peft_format import save_peft_adapter

GENERATION_CONFIG = "generation_config.json"
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "masked_lm": None}


def export_peft(built: BuiltModel, source: ModelSource, dest: Path) -> tuple[Path | None, str]:
    """Writes the LoRA part in PEFT's format (every rank calls it). Returns the folder (None if no LoRA) and a note.

    Fully-tuned modules go into PEFT's ``modules_to_save`` when PEFT can express them; otherwise the adapter
    holds LoRA only and the note says so (the merged export always holds everything).
    """
    if not adapter_layers(built.model):
        return None, "no LoRA in the PEFT config: no PEFT adapter written"
    kwargs = {"base_model_name_or_path": str(source.path.resolve()),
              "task_type": PEFT_TASK_TYPES[source.task]}
    try:
        return save_peft_adapter(built.model, dest, **kwargs), ""
    except ValueError as e:
        try:
            path = save_peft_adapter(built.model, dest, include_modules_to_save=False, **kwargs)
        except ValueError as lora_only:  # e.g. a stack mixing DoRA and plain LoRA: PEFT has one use_dora
            return None, f"no PEFT adapter written ({lora_only}); the merged export holds everything"
        return path, f"PEFT adapter holds LoRA only; fully-tuned weights are in the merged export ({e})"


@torch.no_grad()
def model_logits(model: nn.Module, input_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Eval-mode logits (float32, CPU) of ``input_ids``; a collective on a sharded model."""
    model.eval()
    return model(input_ids=input_ids.to(device)).logits.float().cpu()


def export_merged(built: BuiltModel, source: ModelSource, dest: Path, shard_size_gb: float, tokenizer,
                  show_progress: bool) -> Path:
    """Merges the adapters into the sharded weights and writes a Hugging Face checkpoint (every rank calls it).

    The weights and ``config.json`` are written shard-wise by every rank (``save_model_state``); rank 0 then adds
    the base's ``generation_config.json`` (when it has one) and the tokenizer files. After this the model has its
    original architecture; it no longer trains.
    """
    merge_peft(built.method, built.model)
    config = built.hf_config
    config.architectures = [built.architecture]
    if built.tied.ties:
        config.tie_word_embeddings = False  # both copies are saved; they may differ after training
    save_model_state(dest, None, built.model, shard_size_gb=shard_size_gb, show_progress=show_progress,
                     config=config)
    if is_main_rank():
        if (source.path / GENERATION_CONFIG).is_file():  # generate() keeps the base's decoding defaults
            shutil.copyfile(source.path / GENERATION_CONFIG, dest / GENERATION_CONFIG)
        tokenizer.save_pretrained(dest)
    barrier()
    return dest


@dataclasses.dataclass(frozen=True)
class Reproduction:
    """How closely a reloaded export reproduces the adapted model's logits."""

    what: str
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_rel_diff < self.tolerance

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        return f"{self.what}: max abs diff {self.max_abs_diff:.2e}, max rel diff {self.max_rel_diff:.2e} [{verdict}]"


def _compare(what: str, got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> Reproduction:
    diff = (got - expected).abs().max().item()
    # A merged 16-bit weight is rounded once more than W + s B A computed on the fly: allow that rounding.
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    return Reproduction(what, diff, diff / max(expected.abs().max().item(), 1e-12), tolerance)


@torch.no_grad()
def verify_exports(source: ModelSource, merged_dir: Path, adapter_dir: Path | None, dtype: torch.dtype,
                   input_ids: torch.Tensor, expected: torch.Tensor) -> list[Reproduction]:
    """Reloads the exports with plain ``transformers`` / ``peft`` in this process and compares their logits."""
    cls = auto_model_class(source.task)
    merged = cls.from_pretrained(merged_dir, dtype=dtype).eval()
    results = [_compare(f"merged export ({cls.__name__}.from_pretrained)", merged(input_ids=input_ids).logits.float(),
                        expected, dtype)]
    del merged
    if adapter_dir is not None:
        from peft import PeftModel

        base = cls.from_pretrained(source.path, dtype=dtype)
        with warnings.catch_warnings():
            # PEFT checks rank_pattern / alpha_pattern keys against targeted modules only, so the keys of expert
            # parameters (target_parameters) draw a warning that they were ignored. They are not: the logits below
            # compare the scales too.
            warnings.filterwarnings("ignore", r"The following (rank|alpha)_pattern keys did not match", RuntimeWarning)
            peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        results.append(_compare("PEFT adapter (PeftModel.from_pretrained)",
                                peft_model(input_ids=input_ids).logits.float(), expected, dtype))
    return results
