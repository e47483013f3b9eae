"""The training loop: AdamW on the trainable parameters, deterministic per step, with progress and logging."""

import dataclasses
import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from d9d.finetune.config import OptimizerConfig
from d9d.finetune.data import IGNORE_INDEX, Batch, PackedBatches, step_seed
from d9d.parallel.grad_norm import clip_grad_norm_


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the parameters that train (adapters and fully-tuned modules) only.

    Raises:
        ValueError: If nothing in the model trains.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the PEFT config leaves no trainable parameter")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def learning_rate(cfg: OptimizerConfig, step: int) -> float:
    """Linear warm-up to ``cfg.lr`` over ``warmup_steps``, then constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def loss_terms(model: nn.Module, batch: Batch, task: str, device: torch.device,
               dp_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_to_backward, summed_token_loss)`` of this rank's slice.

    The backward loss is this rank's summed token loss over the *global* target count, times the data-parallel
    size (``dp_size``; ``None``: the world size): FSDP2 averages gradients over the data-parallel ranks, so the
    update equals that of the global mean token loss whatever the split (ranks may hold different numbers of
    masked-LM targets).
    """
    input_ids, labels = batch.input_ids.to(device), batch.labels.to(device)
    logits = model(input_ids=input_ids).logits.float()
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
    if dp_size is None:
        dp_size = dist.get_world_size() if dist.is_initialized() else 1
    return token_loss * dp_size / batch.num_target_tokens, token_loss.detach()


@dataclasses.dataclass
class TrainLog:
    """Per-step mean token losses (global), keyed by step, and throughput."""

    losses: dict[int, float] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    tokens: int = 0


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: PackedBatches,
    opt_cfg: OptimizerConfig,
    start_step: int,
    steps: int,
    seed: int,
    log_interval: int,
    device: torch.device,
    on_step_end: Callable[[int], None] | None = None,
    dp: tuple[int, int] | None = None,
) -> TrainLog:
    """Trains steps ``start_step .. steps - 1``. ``on_step_end(completed_steps)`` runs after each step (checkpoints).

    Dropout is re-seeded from ``(seed, step, dp rank)`` before every step, so a resumed run replays exactly and
    the ranks of a tensor-parallel group draw the same seeds (see ``d9d/ops/sharding.py``). ``dp`` is this rank's
    ``(data-parallel rank, data-parallel size)``; ``None``: ``(rank, world size)``.

    Raises:
        FloatingPointError: If the loss becomes NaN or infinite; the message names the step.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    main = rank == 0
    dp_rank, dp_size = dp if dp is not None else (rank, world)
    log = TrainLog()
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    bar = tqdm(total=steps, initial=start_step, desc="fine-tune", disable=not main, dynamic_ncols=True,
               mininterval=0.5)
    started = time.perf_counter()
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(opt_cfg, step)
        torch.manual_seed(step_seed(seed, step, dp_rank))
        batch = data.batch(step, dp_rank, dp_size)
        loss, token_loss = loss_terms(model, batch, data.task, device, dp_size)
        loss.backward()
        if opt_cfg.grad_clip_norm is not None:
            clip_grad_norm_(trainable, opt_cfg.grad_clip_norm, foreach=True)  # across meshes (tensor parallelism)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.is_initialized():
            dist.all_reduce(token_loss)  # every rank of a tp group holds its dp rank's whole loss: count it once
        mean_loss = token_loss.item() / batch.num_target_tokens / (world // dp_size)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss is {mean_loss} at step {step}; lower optimizer.lr")
        log.losses[step] = mean_loss
        dt = time.perf_counter() - t0
        log.tokens += data.tokens_per_step
        tokens_per_s = data.tokens_per_step / dt
        bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        bar.update(1)
        done = step + 1
        if main and (done % log_interval == 0 or done == steps):
            bar.write(f"step {done}/{steps} | loss {mean_loss:.4f} | lr {learning_rate(opt_cfg, step):.2e} | "
                      f"{tokens_per_s:,.0f} tok/s")
        if on_step_end is not None:
            on_step_end(done)
    bar.close()
    log.seconds = time.perf_counter() - started
    return log
