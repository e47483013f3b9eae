"""One fine-tune run, start to finish: set up, load, train (resuming if asked), checkpoint, export, verify."""

import dataclasses
import json
import os
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from d9d.finetune.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from d9d.finetune.config import FinetuneConfig
from d9d.finetune.data import PackedBatches, load_documents, pack_documents
from d9d.finetune.export import export_merged, export_peft, model_logits, verify_exports
from d9d.finetune.model import build_model, prepare_model_source
from d9d.finetune.train import build_optimizer, train
from d9d.parallel import find_free_port, init_parallel
from d9d.peft import count_parameters
from d9d.peft.lora.peft_format import load_peft_adapter

SUMMARY_FILE = "summary.json"


@dataclasses.dataclass
class RunSummary:
    """What a run did, as written to ``<work_dir>/summary.json`` by rank 0."""

    world_size: int
    start_step: int
    steps: int
    losses: dict[int, float]
    first_loss: float | None
    last_loss: float | None
    train_seconds: float
    tokens_per_second: float
    trainable_parameters: int
    total_parameters: int
    base_model: str
    checkpoint: str | None
    peft_adapter: str | None
    merged_export: str
    notes: list[str]
    reproduction: list[dict]


def setup_distributed(timeout_s: float, dp_replicate: int = 1, tp: int = 1):
    """The process group from torchrun's environment and the named mesh; a plain ``python`` run is a world of one."""
    if "RANK" not in os.environ and not dist.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(find_free_port()))
    mesh = init_parallel(dp_replicate=dp_replicate, tp=tp, timeout=timedelta(seconds=timeout_s))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return mesh, device


def _say(main: bool, text: str) -> None:
    if main:
        print(text, flush=True)


def run_finetune(cfg: FinetuneConfig) -> RunSummary:
    """Runs ``cfg`` on every rank of the (torchrun) job; returns the summary (complete on rank 0)."""
    from transformers import AutoTokenizer

    # FSDP2 warns that the root returns a view (HF's logits); the loop never modifies outputs in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    mesh, device = setup_distributed(cfg.timeout_s, cfg.parallel.dp_replicate, cfg.parallel.tp)
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank, dp_size = mesh.dp_rank, mesh.dp_size  # the ranks of a tp group share a batch
    main = rank == 0
    ckpt_root = cfg.checkpoint_dir()
    earlier = list_checkpoints(ckpt_root)
    if earlier and not cfg.checkpoint.resume:
        raise ValueError(f"checkpoint.dir {ckpt_root} already holds checkpoints of an earlier run (latest: "
                         f"{earlier[-1].name}); pass --resume to continue it, or remove them or choose another "
                         "work_dir to start afresh")
    source = prepare_model_source(cfg)
    _say(main, f"[d9d] world size {world} = dp_replicate {mesh.dims.dp_replicate} x dp_shard {mesh.dims.dp_shard} "
               f"x tp {mesh.dims.tp}, device {device.type}; base model {source.path} ({source.task})")
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_path)
    sequences = pack_documents(load_documents(cfg.data.text_files), tokenizer, cfg.data.seq_len)
    special = [t for t in (tokenizer.sep_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id,
                           tokenizer.bos_token_id, tokenizer.pad_token_id) if t is not None]
    data = PackedBatches(sequences, cfg.data.global_batch_size, cfg.seed, source.task,
                         mask_token_id=tokenizer.mask_token_id, mlm_probability=cfg.data.mlm_probability,
                         special_token_ids=special)
    data.batch(0, dp_rank, dp_size)  # validates the batch split before the model is built
    _say(main, f"[d9d] data: {sequences.shape[0]} sequences of {cfg.data.seq_len} tokens, global batch "
               f"{cfg.data.global_batch_size} ({cfg.data.global_batch_size // dp_size} per data-parallel rank)")

    built = build_model(cfg, source, mesh, device, show_progress=main)
    if cfg.init_adapter_dir is not None:
        load_peft_adapter(built.model, cfg.init_adapter_dir)
        _say(main, f"[d9d] adapters initialized from the PEFT adapter {cfg.init_adapter_dir}")
    counts = count_parameters(built.model)
    _say(main, f"[d9d] {counts}")
    optimizer = build_optimizer(built.model, cfg.optimizer)

    start_step = 0
    if cfg.checkpoint.resume and earlier:
        start_step = load_checkpoint(earlier[-1], built.model, optimizer)
        _say(main, f"[d9d] resumed from {earlier[-1]} at step {start_step}")
        if start_step >= cfg.steps:
            _say(main, f"[d9d] nothing to train: the checkpoint is at step {start_step} and steps is {cfg.steps} "
                       "(raise --steps to train further); exporting it")
    last_ckpt: list[Path] = []

    def on_step_end(done: int) -> None:
        interval = cfg.checkpoint.interval
        if done == cfg.steps or (interval and done % interval == 0):
            last_ckpt[:] = [save_checkpoint(ckpt_root, done, built.model, optimizer, cfg.checkpoint.keep_last)]

    log = train(built.model, optimizer, data, cfg.optimizer, start_step, cfg.steps, cfg.seed, cfg.log_interval,
                device, on_step_end, dp=(dp_rank, dp_size))
    losses = [log.losses[s] for s in sorted(log.losses)]
    if losses:
        _say(main, f"[d9d] loss {losses[0]:.4f} (step {start_step + 1}) -> {losses[-1]:.4f} (step {cfg.steps}) in "
                   f"{log.seconds:.1f}s, {log.tokens / max(log.seconds, 1e-9):,.0f} tok/s")

    notes: list[str] = []
    adapter_dir, note = export_peft(built, source, cfg.peft_adapter_dir())
    if note:
        notes.append(note)
        _say(main, f"[d9d] note: {note}")
    probe = data.global_batch(0)[0][:2]
    expected = model_logits(built.model, probe, device)
    merged_dir = export_merged(built, source, cfg.merged_dir(), cfg.export.shard_size_gb, tokenizer,
                               show_progress=main)
    reproduction = []
    if main and cfg.export.verify:
        dtype = getattr(torch, cfg.dtype)
        results = verify_exports(source, merged_dir, adapter_dir if not note else None, dtype, probe, expected)
        reproduction = [{**dataclasses.asdict(r), "ok": r.ok} for r in results]
        for r in results:
            _say(main, f"[d9d] reproduction check, {r}")
    _say(main, f"[d9d] PEFT adapter: {adapter_dir}\n[d9d] merged export: {merged_dir}"
               + (f"\n[d9d] checkpoint: {last_ckpt[0]}" if last_ckpt else ""))
    summary = RunSummary(
        world_size=world, start_step=start_step, steps=cfg.steps, losses=log.losses,
        first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
        train_seconds=log.seconds, tokens_per_second=log.tokens / max(log.seconds, 1e-9),
        trainable_parameters=counts.trainable, total_parameters=counts.total, base_model=str(source.path),
        checkpoint=str(last_ckpt[0]) if last_ckpt else None, peft_adapter=str(adapter_dir) if adapter_dir else None,
        merged_export=str(merged_dir), notes=notes, reproduction=reproduction,
    )
    if main:
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        (cfg.work_dir / SUMMARY_FILE).write_text(json.dumps(dataclasses.asdict(summary), indent=2) + "\n")
    dist.barrier()
    return summary
