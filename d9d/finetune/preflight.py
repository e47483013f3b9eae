"""Checks of a run's inputs, made before the heavy imports (transformers) and the process group: the mesh sizes
against the launch's world size, and the paths on disk.

A typo in a path is then reported in about the time it takes to import torch, naming the config field, instead of
after the model and tokenizer libraries loaded and every rank joined.
"""

from pathlib import Path

from d9d.finetune.config import FinetuneConfig, LocalModelSource
from d9d.parallel import ParallelDims, launch_world_size
from d9d.peft.lora.peft_format import ADAPTER_WEIGHTS, read_adapter_config

# Any one of these makes a folder a tokenizer that transformers' AutoTokenizer can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tiktoken.model")


def check_tokenizer_dir(path: Path, field: str) -> None:
    """Raises ``ValueError`` naming ``field`` and the expected files if ``path`` holds no tokenizer."""
    if not path.is_dir():
        raise ValueError(f"{field}: {str(path)!r} is not a folder")
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise ValueError(
            f"{field}: {str(path)!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}, *.tiktoken); "
            "put the tokenizer there, or set model.tokenizer_path to the folder that holds it"
        )


def check_inputs(cfg: FinetuneConfig) -> None:
    """Checks ``cfg`` against this launch and the disk: the mesh sizes against torchrun's world size, then every
    input path (the local model folder and its tokenizer, the text files, the adapter).

    Raises:
        ValueError: On the first problem; the message names the config field (and the path).
    """
    ParallelDims(launch_world_size(), cfg.parallel.dp_replicate, cfg.parallel.tp)
    source = cfg.model
    if isinstance(source, LocalModelSource):
        if not (source.path / "config.json").is_file():
            raise ValueError(f"model.path: {str(source.path)!r} has no config.json (expected a Hugging Face folder)")
        if source.tokenizer_path is not None:
            check_tokenizer_dir(source.tokenizer_path, "model.tokenizer_path")
        else:
            check_tokenizer_dir(source.path, "model.path (the tokenizer folder unless model.tokenizer_path is set)")
    for path in cfg.data.text_files or []:
        if not path.is_file():
            raise ValueError(f"data.text_files: {str(path)!r} is not a file")
    if cfg.init_adapter_dir is not None:
        read_adapter_config(cfg.init_adapter_dir)
        if not (cfg.init_adapter_dir / ADAPTER_WEIGHTS).is_file():
            raise ValueError(f"init_adapter_dir: {str(cfg.init_adapter_dir)!r} has no {ADAPTER_WEIGHTS}")
