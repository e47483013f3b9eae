"""The LoRA wrapper of an ``nn.Embedding``, with Hugging Face PEFT's semantics and shapes."""

import torch
import torch.nn.functional as F
from torch import nn

from d9d.adapter import AdapterLayer, PeftAdapterSpec
from d9d.dtensor import full_tensor
from d9d.peft.lora.config import LoRAParameters
from d9d.peft.lora.merge import merge_lora_weight_


class LoRAEmbedding(AdapterLayer):
    """``base(ids) + scale * A[:, ids]^T B^T`` around a frozen ``nn.Embedding`` kept as ``base``.

    As in PEFT, ``lora_embedding_A`` is r x num_embeddings (starting at zero) and ``lora_embedding_B`` is
    embedding_dim x r (starting normal), and the adapter sees no dropout (PEFT applies none to embeddings). The
    forward gathers the columns of ``A`` for the ids (an embedding lookup in ``A^T``, honouring the base layer's
    ``padding_idx`` and ``scale_grad_by_freq`` as PEFT does), then multiplies the ``(..., r)`` result by ``B^T``.
    """

    def __init__(self, base_layer: nn.Embedding, params: LoRAParameters):
        """Args:
        base_layer: The embedding to wrap; it becomes ``self.base`` (same object, same parameters).
        params: Rank, scale and adapter dtype; ``dropout`` is recorded for PEFT's config but not applied.

        Raises:
            ValueError: If the embedding renormalizes rows in its forward (``max_norm``) or has sparse gradients.
        """
        super().__init__()
        if base_layer.max_norm is not None or base_layer.sparse:
            raise ValueError("LoRA cannot wrap an nn.Embedding with max_norm or sparse=True (the lookup would "
                             "renormalize or sparsify the adapter as well)")
        if params.use_dora:
            raise ValueError("DoRA on nn.Embedding is not supported; use plain LoRA (use_dora=False) for embeddings")
        self.base = base_layer
        dtype = getattr(torch, params.dtype) if params.dtype else base_layer.weight.dtype
        device = base_layer.weight.device
        num_embeddings, embedding_dim = base_layer.weight.shape
        self.lora_embedding_A = nn.Parameter(torch.empty(params.r, num_embeddings, dtype=dtype, device=device))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, params.r, dtype=dtype, device=device))
        self.r = params.r
        self.alpha = params.alpha
        self.use_rslora = params.use_rslora
        self.scale = params.alpha / (params.r**0.5 if params.use_rslora else params.r)
        self.dropout = params.dropout
        self.reset_adapter_parameters()

    def adapter_parameter_names(self) -> tuple[str, ...]:
        return ("lora_embedding_A", "lora_embedding_B")

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """Zero ``lora_embedding_A``, standard-normal ``lora_embedding_B`` (PEFT's init for embeddings)."""
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base(ids)
        after_A = F.embedding(ids, self.lora_embedding_A.t(), padding_idx=self.base.padding_idx,
                              scale_grad_by_freq=self.base.scale_grad_by_freq)
        return result + (after_A @ self.lora_embedding_B.t() * self.scale).to(result.dtype)

    @torch.no_grad()
    def merge_into_base(self) -> nn.Embedding:
        """Adds ``scale * A^T B^T`` to ``base.weight`` in place (vocabulary-row shards stay local) and returns ``base``.

        The update of a row of the table only needs that row's column of ``A``, so each rank of a row-sharded table
        updates its own rows; only the small adapters are gathered.
        """
        up = full_tensor(self.lora_embedding_A).t().contiguous()  # num_embeddings x r: the rows of the update
        down = full_tensor(self.lora_embedding_B).t().contiguous()  # r x embedding_dim
        merge_lora_weight_(self.base.weight, down, up, self.scale)
        return self.base

    def peft_spec(self) -> PeftAdapterSpec:
        return PeftAdapterSpec(
            tensors={"lora_embedding_A": "lora_embedding_A", "lora_embedding_B": "lora_embedding_B"},
            options={"r": self.r, "lora_alpha": self.alpha, "use_rslora": self.use_rslora,
                     "lora_dropout": self.dropout, "use_dora": False},
        )

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}"
