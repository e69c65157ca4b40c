"""Which probe examples are pictures, and their thumbnails (known arrays)."""

from __future__ import annotations

import torch

from gradwatch.functional.thumbnails import as_image, thumbnail, thumbnail_grid


def test_what_counts_as_a_picture() -> None:
    chw, hwc = torch.rand(3, 8, 6), torch.rand(8, 6, 3)
    assert torch.equal(as_image(chw), chw)
    assert torch.equal(as_image((hwc, 1)), hwc.permute(2, 0, 1))  # the input of an (input, target) pair
    assert as_image({"pixel_values": torch.rand(1, 5, 5), "labels": 2}).shape == (1, 5, 5)
    assert as_image({"image": torch.rand(6, 7)}).shape == (1, 6, 7)  # grey, by its key
    assert as_image(torch.randint(0, 255, (1, 8, 8), dtype=torch.uint8)).shape == (1, 8, 8)
    for not_a_picture in (torch.rand(64), torch.rand(16, 32), torch.rand(2, 8, 8), torch.rand(3, 2, 8),
                          {"input_ids": torch.arange(10)}, torch.arange(48).reshape(3, 4, 4), "text"):
        assert as_image(not_a_picture) is None


def test_thumbnail_scales_sharp_and_keeps_the_aspect() -> None:
    x = torch.tensor([[0.0, 1.0], [2.0, 4.0]])[None]  # 1 x 2 x 2, range 0..4
    t = thumbnail(x, 4)
    assert t.shape == (3, 4, 4)
    want = torch.tensor([[0, 0, .25, .25], [0, 0, .25, .25], [.5, .5, 1, 1], [.5, .5, 1, 1]])
    assert torch.equal(t, want.expand(3, 4, 4))  # nearest-neighbour: each pixel a 2 x 2 block, min-max scaled
    wide = thumbnail(torch.rand(1, 2, 8), 8)  # 8 wide, 2 high: centred rows 3..4, black around
    assert wide[:, :3].eq(0).all() and wide[:, 5:].eq(0).all()
    assert torch.equal(thumbnail(torch.full((1, 4, 4), 7.0), 4), torch.full((3, 4, 4), 0.5))  # flat: mid grey
    assert thumbnail(torch.rand(3, 64, 64), 16).shape == (3, 16, 16)  # shrunk by area averaging


def test_grid_layout() -> None:
    rows = [[torch.rand(1, 4, 4)] * 3, [torch.rand(1, 4, 4)]]
    g = thumbnail_grid(rows, size=4, pad=1)
    assert g.shape == (3, 1 + 2 * 5, 1 + 3 * 5)
    assert torch.equal(g[:, 1:5, 1:5], thumbnail(rows[0][0], 4))
    assert g[:, 6:10, 6:].eq(1).all()  # the short second row leaves white
