"""How the export cuts a block it cannot receive in place (columns, 2-D splits) into bounded chunks."""

import pytest
import torch

from d9d.model_state.io.pieces import chunks

pytestmark = pytest.mark.local


@pytest.mark.parametrize(("shape", "limit"), [((10, 6), 16), ((10, 6), 24), ((10, 6), 1000), ((3, 4, 5), 28),
                                               ((3, 4, 5), 80), ((7,), 8), ((2, 3), 1)])
def test_chunks_tile_the_block_each_contiguous_and_within_the_limit(shape: tuple[int, ...], limit: int) -> None:
    offset_global, offset_local = (2, 5, 1)[:len(shape)], (1, 0, 3)[:len(shape)]
    block = tuple(tuple(slice(o, o + n) for o, n in zip(offsets, shape, strict=True))
                  for offsets in (offset_global, offset_local))
    itemsize = 4
    covered = torch.zeros(shape, dtype=torch.int)
    for global_slices, local_slices in chunks(block, itemsize, limit):
        part = tuple(slice(s.start - o, s.stop - o) for s, o in zip(global_slices, offset_global, strict=True))
        assert part == tuple(slice(s.start - o, s.stop - o) for s, o in zip(local_slices, offset_local, strict=True))
        covered[part] += 1
        assert covered[part].is_contiguous()  # what the sender sends and the receiver's buffer holds
        assert covered[part].numel() * itemsize <= max(limit, itemsize)
    assert bool((covered == 1).all())
