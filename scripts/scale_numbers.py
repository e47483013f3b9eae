"""The numbers of ``docs/scale.md``: a Llama of 70B parameters on 8 nodes x 8 GPUs, from d9d's own code paths.

Nothing is allocated and no process group is started. The model is built on ``meta`` by ``transformers``,
injected by d9d with the PEFT stack of ``configs/local_causal_lm.json``, and for each layout the local shard of
every tensor on every rank comes from DTensor's own sharding arithmetic
(``torch.distributed.tensor._utils._compute_local_shape_and_global_offset``, what ``distribute_tensor`` and
FSDP2 use). From them:

- load: bytes each rank reads = its local shards of the checkpoint's tensors (every group of
  ``checkpoint_mapper_for`` passes through, and the loader reads exactly the local shard of such a group: the
  torchrun tests assert ``LoadStats.bytes_read`` equals it);
- export: the files ``save_model_state`` plans (``_plan_files``, the same code), file ``i`` written by rank
  ``i % world``; each tensor's writer receives every piece of the tensor from its replica group but its own;
- memory per GPU: the sharded frozen base, the sharded trainable adapters with their gradients and AdamW's two
  states (float32), and the all-gathered parameters FSDP2 holds at once: the root group (embeddings, final norm,
  lm_head: ``shard_model`` shards the root last, and its parameters stay gathered from the root's pre-forward to
  its post-forward, and again through its backward), the decoder layer computing and the one prefetched (FSDP2's
  default overlap issues the next group's all-gather one group ahead).

Usage: ``python scripts/scale_numbers.py`` prints the tables that docs/scale.md shows.
"""

import re
from dataclasses import dataclass

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

GB = 1e9
NODES, GPUS = 8, 8
WORLD = NODES * GPUS
SHARD_SIZE_GB = 4.0  # save_model_state's and the fine-tune export's default file size


@dataclass(frozen=True)
class Layout:
    name: str
    mesh_shape: tuple[int, ...]
    placements: tuple  # of a Shard(0) FSDP parameter

    def coordinate(self, rank: int) -> list[int]:
        return list(torch.arange(WORLD).view(self.mesh_shape).eq(rank).nonzero()[0].tolist())

    def split(self) -> int:
        """Ranks that split one tensor (the others hold replicas)."""
        return int(torch.tensor([n for n, p in zip(self.mesh_shape, self.placements, strict=True)
                                 if isinstance(p, Shard)]).prod())


LAYOUTS = [Layout("1-D FSDP (64)", (WORLD,), (Shard(0),)),
           Layout("HSDP 8 x 8 (dp_replicate = nodes)", (NODES, GPUS), (Replicate(), Shard(0)))]


def llama_70b():
    import transformers

    from d9d.peft import inject_peft_and_freeze
    from d9d.peft.lora import LoRA, LoRAConfig, LoRAParameters

    config = transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    base = dict(model.state_dict())
    method = LoRA(LoRAConfig(module_name_pattern=re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"),
                             params=LoRAParameters(r=16, alpha=32, dtype="float32")))
    inject_peft_and_freeze(method, model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return base, trainable


def nbytes(shape, dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * dtype.itemsize


def local_bytes(t: torch.Tensor, layout: Layout, rank: int) -> int:
    shape, _ = _compute_local_shape_and_global_offset(t.shape, layout.mesh_shape, layout.coordinate(rank),
                                                      layout.placements)
    return nbytes(shape, t.dtype)


def main() -> None:
    from d9d.model_state.io.save import _plan_files
    from d9d.model_state.mapper import identity_mapper_from_keys

    base, trainable = llama_70b()
    total = sum(t.nbytes for t in base.values())
    largest_key = max(base, key=lambda k: base[k].nbytes)
    block_bytes = sum(t.nbytes for k, t in base.items() if k.startswith("model.layers.0."))
    root_bytes = sum(t.nbytes for k, t in base.items() if not k.startswith("model.layers."))
    adapters = sum(t.numel() for t in trainable.values()) * 4
    print(f"Llama: {sum(t.numel() for t in base.values()) / 1e9:.2f}B parameters, bf16 checkpoint {total / GB:.1f} GB;"
          f" one decoder layer {block_bytes / GB:.2f} GB; root group (embeddings, final norm, lm_head) "
          f"{root_bytes / GB:.2f} GB; largest tensor {largest_key} {base[largest_key].nbytes / GB:.2f} GB; LoRA r=16 "
          f"on the 7 projections: {adapters / 4 / 1e6:.0f}M float32 parameters ({adapters / GB:.2f} GB).\n")

    files = _plan_files(identity_mapper_from_keys(base), base, int(SHARD_SIZE_GB * GB))
    print("| layout | ranks splitting a tensor | load: read per rank (GB) | load: read in all (TB) "
          "| sharded base (GB) | adapters + grads + AdamW (GB) | all-gathered: root group + 2 layers (GB) "
          "| memory per GPU before activations (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    export_rows = []
    for layout in LAYOUTS:
        per_rank = [sum(local_bytes(t, layout, r) for t in base.values()) for r in range(WORLD)]
        train_state = max(sum(local_bytes(t, layout, r) for t in trainable.values()) for r in range(WORLD)) * 4
        gathered = root_bytes + 2 * block_bytes
        memory = max(per_rank) + train_state + gathered
        print(f"| {layout.name} | {layout.split()} | {max(per_rank) / GB:.2f} | {sum(per_rank) / 1e12:.2f} "
              f"| {max(per_rank) / GB:.2f} | {train_state / GB:.2f} | {gathered / GB:.2f} | {memory / GB:.1f} |")

        # Export: the writer of file i is rank i % WORLD; it receives every piece but its own from its replica
        # group (the ranks of its mesh row that split the tensor).
        received, cross_node = [0] * WORLD, [0] * WORLD
        owned_file = [0] * WORLD
        for i, planned in enumerate(files):
            owner = i % WORLD
            owned_file[owner] = max(owned_file[owner], planned.weight_bytes)
            for group in planned.groups:
                for key in group.inputs:
                    t = base[key]
                    own = local_bytes(t, layout, owner)
                    received[owner] += t.nbytes - own
                    if layout.split() == WORLD:  # sources on every node: 7/8 of the pieces cross nodes
                        cross_node[owner] += t.nbytes - sum(local_bytes(t, layout, r) for r in
                                                            range(owner // GPUS * GPUS, owner // GPUS * GPUS + GPUS))
        writer = max(range(WORLD), key=lambda r: received[r])
        export_rows.append((layout, received, cross_node, owned_file, per_rank, writer))

    rounds = -(-len(files) // WORLD)
    print(f"\nExport with shard_size_gb={SHARD_SIZE_GB:g}: {len(files)} files, {rounds} round(s) of {WORLD} writers; "
          f"largest file {max(f.weight_bytes for f in files) / GB:.2f} GB.\n")
    print("| layout | writers | received by the busiest writer (GB) | of which across nodes (GB) "
          "| network traffic in all (GB) | host memory per writer: one file (GB) "
          "| GPU memory per writer: shards + one group (GB) |")
    print("|---|---|---|---|---|---|---|")
    for layout, received, cross_node, owned_file, per_rank, writer in export_rows:
        writers = sum(1 for b in owned_file if b)
        print(f"| {layout.name} | {writers} | {received[writer] / GB:.2f} | {cross_node[writer] / GB:.2f} "
              f"| {sum(received) / GB:.1f} | {owned_file[writer] / GB:.2f} "
              f"| {(per_rank[writer] + base[largest_key].nbytes) / GB:.2f} |")


if __name__ == "__main__":
    main()
