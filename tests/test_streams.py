"""Per-image random streams: an image's draws depend only on its own position, never on the batch."""

import torch

from sinai.attacks.streams import ImageStreams


def _alone(x: torch.Tensor, draws: list[tuple[list[int], int]]) -> dict[int, list[torch.Tensor]]:
    """Each image's values when it draws alone, for the same sequence of (images, count) draws."""
    out: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(x))}
    for i in range(len(x)):
        streams = ImageStreams(x, seed=3)
        for images, count in draws:
            if i in images:
                out[i].append(streams.uniform(torch.tensor([i]), (count,))[0])
    return out


def test_lockstep_draws_equal_each_images_draws_alone_whatever_came_between():
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    streams = ImageStreams(x, seed=3)
    idx = torch.arange(6)
    sub = torch.tensor([1, 4])
    moved = torch.tensor([0, 2, 5])
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(6)}
    draws = []

    def draw(images: torch.Tensor, count: int) -> None:
        draws.append((images.tolist(), count))
        for i, row in zip(images.tolist(), streams.uniform(images, (count,)), strict=True):
            got[i].append(row)

    draw(idx, 5)
    draw(idx, 5)  # the same tensor again: its images still in lockstep
    draw(sub, 3)  # a draw between: images 1 and 4 move ahead
    draw(idx, 5)  # the same tensor, but its images no longer share a position
    draw(idx, 5)
    draw(moved, 2)
    moved.copy_(torch.tensor([1, 3, 4]))  # the same tensor object, other images
    draw(moved, 2)
    want = _alone(x, draws)
    for i in range(6):
        assert len(got[i]) == len(want[i])
        for a, b in zip(got[i], want[i], strict=True):
            assert torch.equal(a, b)
