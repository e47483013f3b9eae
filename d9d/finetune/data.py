"""Training data: real text, tokenized with the model's tokenizer, packed into fixed-length sequences.

Every batch is a pure function of ``(seed, step)``: the order is a seeded permutation per epoch and masking uses a
generator seeded from the step, so a resumed run sees exactly the batches an uninterrupted run would, and world
sizes 1 and 2 see the same global batch (each rank takes its contiguous slice).
"""

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

IGNORE_INDEX = -100


def load_documents(text_files: Sequence[Path] | None) -> list[str]:
    """The documents to train on: the given files, or Python's documentation topics (ship with CPython).

    Raises:
        ValueError: If a file is missing or empty; the message names it.
    """
    if text_files is None:
        from pydoc_data.topics import topics

        return [topics[name] for name in sorted(topics)]
    docs = []
    for path in text_files:
        if not Path(path).is_file():
            raise ValueError(f"data.text_files: {str(path)!r} is not a file")
        text = Path(path).read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"data.text_files: {str(path)!r} is empty")
        docs.append(text)
    return docs


def pack_documents(docs: Sequence[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenizes ``docs`` (no special tokens), joins them with a separator and cuts ``(n, seq_len)`` sequences.

    The separator is the tokenizer's EOS token, or SEP for BERT-style tokenizers. The tail shorter than
    ``seq_len`` is dropped.

    Raises:
        ValueError: If the text gives fewer than two sequences.
    """
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        if sep is not None:
            ids.append(sep)
    n = len(ids) // seq_len
    if n < 2:
        raise ValueError(f"the data gives {len(ids)} tokens, fewer than two sequences of data.seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One rank's slice of a global batch.

    Attributes:
        input_ids: ``(b, seq_len)`` token ids fed to the model.
        labels: ``(b, seq_len)`` targets, ``-100`` where no loss is taken (HF convention; causal LMs shift inside).
        num_target_tokens: Target tokens in the *global* batch, to normalize the loss identically on every rank.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    num_target_tokens: int


class PackedBatches:
    """Deterministic batches over packed sequences, for a causal or a masked LM."""

    def __init__(
        self,
        sequences: torch.Tensor,
        global_batch_size: int,
        seed: int,
        task: str,
        mask_token_id: int | None = None,
        mlm_probability: float = 0.15,
        special_token_ids: Sequence[int] = (),
    ):
        """Args:
        sequences: ``(n, seq_len)`` packed token ids.
        global_batch_size: Sequences per step over all ranks.
        seed: Seed of the order and the masking.
        task: ``"causal_lm"`` or ``"masked_lm"``.
        mask_token_id: The ``[MASK]`` id (masked LM only).
        mlm_probability: Fraction of (non-special) tokens to mask.
        special_token_ids: Ids never masked (separators).

        Raises:
            ValueError: If the task is unknown, or a masked LM has no mask token.
        """
        if task not in ("causal_lm", "masked_lm"):
            raise ValueError(f"unknown task {task!r}; expected 'causal_lm' or 'masked_lm'")
        if task == "masked_lm" and mask_token_id is None:
            raise ValueError("the tokenizer has no mask token, which the masked_lm task needs")
        self.sequences = sequences
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.task = task
        self.mask_token_id = mask_token_id
        self.mlm_probability = mlm_probability
        self.special_token_ids = torch.tensor(sorted(set(special_token_ids)), dtype=torch.long)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.sequences.shape[1]

    def global_indices(self, step: int) -> torch.Tensor:
        """Sequence indices of global batch ``step``: a fresh seeded permutation for every pass over the data."""
        n = self.sequences.shape[0]
        start = step * self.global_batch_size
        out = []
        for pos in range(start, start + self.global_batch_size):
            epoch, offset = divmod(pos, n)
            out.append(self._permutation(epoch)[offset])
        return torch.stack(out)

    def _permutation(self, epoch: int) -> torch.Tensor:
        cached = getattr(self, "_perm_cache", None)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0x5EED))
            cached = (epoch, torch.randperm(self.sequences.shape[0], generator=g))
            self._perm_cache = cached
        return cached[1]

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` of the whole global batch of ``step``."""
        ids = self.sequences[self.global_indices(step)]
        if self.task == "causal_lm":
            return ids, ids.clone()
        g = torch.Generator().manual_seed(_mix(self.seed, step, 0x3A5C))
        masked = torch.rand(ids.shape, generator=g) < self.mlm_probability
        masked &= ~torch.isin(ids, self.special_token_ids)
        masked[:, 0] |= ~masked.any(dim=1)  # at least one target per sequence
        labels = torch.where(masked, ids, torch.full_like(ids, IGNORE_INDEX))
        inputs = torch.where(masked, torch.full_like(ids, self.mask_token_id), ids)
        return inputs, labels

    def batch(self, step: int, rank: int, world_size: int) -> Batch:
        """Rank ``rank``'s contiguous slice of global batch ``step``, among ``world_size`` data-parallel ranks.

        Raises:
            ValueError: If the data-parallel size does not divide the global batch size.
        """
        if self.global_batch_size % world_size:
            raise ValueError(f"data.global_batch_size={self.global_batch_size} is not divisible by the data-parallel "
                             f"size {world_size} (world size / parallel.tp)")
        inputs, labels = self.global_batch(step)
        shifted = labels[:, 1:] if self.task == "causal_lm" else labels
        num_targets = int((shifted != IGNORE_INDEX).sum())
        per_rank = self.global_batch_size // world_size
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        return Batch(input_ids=inputs[rows], labels=labels[rows], num_target_tokens=num_targets)


def _mix(*values: int) -> int:
    """A stable 63-bit seed from integers (Python's ``hash`` of ints is stable, but spell it out)."""
    acc = 0x9E3779B97F4A7C15
    for v in values:
        acc = (acc ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
    return acc & 0x7FFFFFFFFFFFFFFF


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global RNG (dropout) for ``step`` on ``rank``: resume re-seeds and replays exactly."""
    return _mix(seed, step, rank, 0xD50)
