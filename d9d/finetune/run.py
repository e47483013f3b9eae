"""One fine-tune run, start to finish: set up, load, train (resuming if asked), checkpoint, export, verify.

:func:`run_finetune` reads as the list of its phases; each phase is a function below it.
"""

import dataclasses
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from d9d.finetune.checkpoint import latest_complete_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from d9d.finetune.config import FinetuneConfig
from d9d.finetune.data import PackedBatches, load_documents, pack_documents
from d9d.finetune.export import export_merged, export_peft, model_logits, verify_exports
from d9d.finetune.model import BuiltModel, ModelSource, build_model, prepare_model_source
from d9d.finetune.session import Session, announce_nodes, distributed_session
from d9d.finetune.train import TrainLog, build_optimizer, train
from d9d.peft import count_parameters
from d9d.peft.lora.peft_format import load_peft_adapter
from d9d.peft.summary import ParameterCount

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


@dataclasses.dataclass
class Exports:
    """What the export phase wrote and how well it reproduces the adapted model."""

    adapter_dir: Path | None
    merged_dir: Path
    notes: list[str]
    reproduction: list[dict]


def run_finetune(cfg: FinetuneConfig) -> RunSummary:
    """Runs ``cfg`` on every rank of the (torchrun) job; returns the summary (complete on rank 0).

    Raises:
        RunFailedError: With one message, printed by one rank, if the run fails (see :func:`distributed_session`).
    """
    # FSDP2 warns that the root returns a view (HF's logits); the loop never modifies outputs in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    with distributed_session(cfg.timeout_s, cfg.parallel.dp_replicate, cfg.parallel.tp) as session:
        announce_nodes(session)
        resume_from = _checkpoint_to_resume(cfg, session)
        source = prepare_model_source(cfg)
        dims = session.mesh.dims
        session.say(f"[d9d] world size {session.world} = dp_replicate {dims.dp_replicate} x dp_shard "
                    f"{dims.dp_shard} x tp {dims.tp}, device {session.device.type}; base model {source.path} "
                    f"({source.task})")
        tokenizer, data = _prepare_data(cfg, source, session)
        built, counts = _build(cfg, source, session)
        optimizer = build_optimizer(built.model, cfg.optimizer)
        start_step = _resume(cfg, resume_from, built, optimizer, session)
        log, last_ckpt = _train(cfg, built, optimizer, data, start_step, session)
        exports = _export(cfg, source, built, data, tokenizer, session)
        summary = _summarize(cfg, session, source, counts, start_step, log, last_ckpt, exports)
        dist.barrier()
    return summary


def _checkpoint_to_resume(cfg: FinetuneConfig, session: Session) -> Path | None:
    """The checkpoint to resume from, if any; refuses to start afresh over another run's checkpoints."""
    root = cfg.checkpoint_dir()
    earlier = list_checkpoints(root)
    if earlier and not cfg.checkpoint.resume:
        raise ValueError(f"checkpoint.dir {root} already holds checkpoints of an earlier run (latest: "
                         f"{earlier[-1].name}); pass --resume to continue it, or remove them or choose another "
                         "work_dir to start afresh")
    if not cfg.checkpoint.resume:
        return None
    latest, skipped = latest_complete_checkpoint(root)
    for reason in skipped:
        session.say(f"[d9d] warning: skipping an incomplete checkpoint: {reason}")
    return latest


def _prepare_data(cfg: FinetuneConfig, source: ModelSource, session: Session) -> tuple[object, PackedBatches]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_path)
    sequences = pack_documents(load_documents(cfg.data.text_files), tokenizer, cfg.data.seq_len)
    special = [t for t in (tokenizer.sep_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id,
                           tokenizer.bos_token_id, tokenizer.pad_token_id) if t is not None]
    data = PackedBatches(sequences, cfg.data.global_batch_size, cfg.seed, source.task,
                         mask_token_id=tokenizer.mask_token_id, mlm_probability=cfg.data.mlm_probability,
                         special_token_ids=special)
    mesh = session.mesh  # the ranks of a tp group share a batch
    data.batch(0, mesh.dp_rank, mesh.dp_size)  # validates the batch split before the model is built
    session.say(f"[d9d] data: {sequences.shape[0]} sequences of {cfg.data.seq_len} tokens, global batch "
                f"{cfg.data.global_batch_size} ({cfg.data.global_batch_size // mesh.dp_size} per data-parallel "
                "rank)")
    return tokenizer, data


def _build(cfg: FinetuneConfig, source: ModelSource, session: Session) -> tuple[BuiltModel, ParameterCount]:
    built = build_model(cfg, source, session.mesh, session.device, show_progress=session.main)
    if cfg.init_adapter_dir is not None:
        load_peft_adapter(built.model, cfg.init_adapter_dir)
        session.say(f"[d9d] adapters initialized from the PEFT adapter {cfg.init_adapter_dir}")
    counts = count_parameters(built.model)
    session.say(f"[d9d] {counts}")
    return built, counts


def _peft_json(cfg: FinetuneConfig) -> dict:
    return cfg.peft_config().model_dump(mode="json")


def _resume(cfg: FinetuneConfig, path: Path | None, built: BuiltModel, optimizer, session: Session) -> int:
    if path is None:
        return 0
    start_step = load_checkpoint(path, built.model, optimizer, peft_config=_peft_json(cfg))
    session.say(f"[d9d] resumed from {path} at step {start_step}")
    if start_step >= cfg.steps:
        session.say(f"[d9d] nothing to train: the checkpoint is at step {start_step} and steps is {cfg.steps} "
                    "(raise --steps to train further); exporting it")
    return start_step


def _train(cfg: FinetuneConfig, built: BuiltModel, optimizer, data: PackedBatches, start_step: int,
           session: Session) -> tuple[TrainLog, Path | None]:
    last_ckpt: list[Path] = []

    def on_step_end(done: int) -> None:
        interval = cfg.checkpoint.interval
        if done == cfg.steps or (interval and done % interval == 0):
            last_ckpt[:] = [save_checkpoint(cfg.checkpoint_dir(), done, built.model, optimizer,
                                            cfg.checkpoint.keep_last, peft_config=_peft_json(cfg))]

    log = train(built.model, optimizer, data, cfg.optimizer, start_step, cfg.steps, cfg.seed, cfg.log_interval,
                session.device, on_step_end, dp=(session.mesh.dp_rank, session.mesh.dp_size))
    losses = [log.losses[s] for s in sorted(log.losses)]
    if losses:
        session.say(f"[d9d] loss {losses[0]:.4f} (step {start_step + 1}) -> {losses[-1]:.4f} (step {cfg.steps}) in "
                    f"{log.seconds:.1f}s, {log.tokens / max(log.seconds, 1e-9):,.0f} tok/s")
    return log, (last_ckpt[0] if last_ckpt else None)


def _export(cfg: FinetuneConfig, source: ModelSource, built: BuiltModel, data: PackedBatches, tokenizer,
            session: Session) -> Exports:
    notes: list[str] = []
    adapter_dir, note = export_peft(built, source, cfg.peft_adapter_dir())
    if note:
        notes.append(note)
        session.say(f"[d9d] note: {note}")
    probe = data.global_batch(0)[0][:2]
    expected = model_logits(built.model, probe, session.device)
    merged_dir = export_merged(built, source, cfg.merged_dir(), cfg.export.shard_size_gb, tokenizer,
                               show_progress=session.main)
    reproduction = []
    if session.main and cfg.export.verify:
        results = verify_exports(source, merged_dir, adapter_dir if not note else None, getattr(torch, cfg.dtype),
                                 probe, expected)
        reproduction = [{**dataclasses.asdict(r), "ok": r.ok} for r in results]
        for r in results:
            session.say(f"[d9d] reproduction check, {r}")
    session.say(f"[d9d] PEFT adapter: {adapter_dir}\n[d9d] merged export: {merged_dir}")
    return Exports(adapter_dir, merged_dir, notes, reproduction)


def _summarize(cfg: FinetuneConfig, session: Session, source: ModelSource, counts: ParameterCount, start_step: int,
               log: TrainLog, last_ckpt: Path | None, exports: Exports) -> RunSummary:
    losses = [log.losses[s] for s in sorted(log.losses)]
    if last_ckpt is not None:
        session.say(f"[d9d] checkpoint: {last_ckpt}")
    summary = RunSummary(
        world_size=session.world, start_step=start_step, steps=cfg.steps, losses=log.losses,
        first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
        train_seconds=log.seconds, tokens_per_second=log.tokens / max(log.seconds, 1e-9),
        trainable_parameters=counts.trainable, total_parameters=counts.total, base_model=str(source.path),
        checkpoint=str(last_ckpt) if last_ckpt else None,
        peft_adapter=str(exports.adapter_dir) if exports.adapter_dir else None,
        merged_export=str(exports.merged_dir), notes=exports.notes, reproduction=exports.reproduction,
    )
    if session.main:
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        (cfg.work_dir / SUMMARY_FILE).write_text(json.dumps(dataclasses.asdict(summary), indent=2) + "\n")
    return summary
