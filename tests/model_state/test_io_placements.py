"""Load and export under every placement, under torchrun (gloo): 1-D FSDP at world sizes 1, 2 and 4, HSDP 2 x 2,
TP 2 by hand (a TP mesh per replica), TP 2 x FSDP 2 (``_StridedShard``).

Each rank must read only its shard's slices of the pass-through tensors (counted by the loader, compared with
what it holds), hold the checkpoint's values, and the export must reload to the same values, written by several
ranks, without ``full_tensor()`` or lone send/recv.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.model_state.placements_worker import FUSED, FUSED_PARTS, RENAMED, Net
from tests.torchrun import Launch, wait_all

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("placements_worker.py")
RUNS = [("fsdp", 1), ("fsdp", 2), ("fsdp", 4), ("hsdp", 4), ("tp", 4), ("tp_fsdp", 4)]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("placements")
    torch.manual_seed(1)
    reference = {k: torch.randn_like(v) for k, v in Net().state_dict().items()}
    torch.save(reference, work / "reference.pt")
    stored = {k: v for k, v in reference.items() if k != FUSED and k not in RENAMED.values()}
    stored.update(zip(FUSED_PARTS, reference[FUSED].split([4, 6]), strict=True))
    stored.update({old: reference[new] for old, new in RENAMED.items()})
    (work / "ckpt").mkdir()
    keys = sorted(stored)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):  # two files, so groups span files
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: stored[k].contiguous() for k in part}, work / "ckpt" / name)
        weight_map.update(dict.fromkeys(part, name))
    (work / "ckpt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    env = {"OMP_NUM_THREADS": "1"}
    by_world: dict[int, list[str]] = {}
    for layout, n in RUNS:
        by_world.setdefault(n, []).append(layout)
    launches = [Launch([str(WORKER), str(work), *layouts], work / f"ws{n}.log", nproc=n, env=env)
                for n, layouts in by_world.items()]
    wait_all(*launches, timeout_s=TIMEOUT_S)
    return work


def facts(work: Path, layout: str, world: int) -> list[dict]:
    return [json.loads((work / f"{layout}-ws{world}" / f"facts{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize(("layout", "world"), RUNS)
def test_each_rank_reads_only_its_slices_and_holds_the_checkpoint(work: Path, layout: str, world: int) -> None:
    for rank, f in enumerate(facts(work, layout, world)):
        assert f["wrong"] == [], (rank, f["wrong"])
        assert f["bytes_read"] == f["expected_read"], (rank, f)
        assert f["whole"] == len(FUSED_PARTS)
        assert f["sliced"] == len(Net().state_dict()) - 1
        if world > 1:  # each rank reads its shard's share (uneven splits: up to one row more), not the whole
            assert f["bytes_read"] < f["checkpoint_bytes"] * 0.75, (rank, f)
    if layout == "tp_fsdp":  # the case under test happened
        assert "_StridedShard" in facts(work, layout, world)[0]["placements"]["layers.0.up.weight"]


@pytest.mark.parametrize(("layout", "world"), RUNS)
def test_export_reloads_to_the_checkpoint(work: Path, layout: str, world: int) -> None:
    export = work / f"{layout}-ws{world}" / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    state = {}
    for name in files:
        state.update(load_file(export / name))
    reference = torch.load(work / "reference.pt")
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    writers = [set(f["written"]) for f in facts(work, layout, world)]
    assert set().union(*writers) == set(files)
    assert all(len(w) >= len(files) // world for w in writers)  # every rank wrote its share of the files
