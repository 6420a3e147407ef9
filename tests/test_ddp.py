"""DropClassHead under DistributedDataParallel: gloo backend, 2 CPU processes.

Each rank sees different data and draws its drops from a differently seeded
generator (so the ranks drop different classes); DDP all-reduces the
gradients, so after a few optimiser steps both ranks must hold bit-identical
parameters. The ranks write their final parameters to files that the test
process compares.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers import check_ranks_agree, run_gloo

STEPS = 4
IMPORTANCES = ("weight", "logits")


def _train_all(rank: int, out_dir: str) -> None:
    for importance in IMPORTANCES:
        _train(rank, importance, Path(out_dir) / f"{importance}_rank{rank}.pt")


def _train(rank: int, importance: str, path: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import debias_ops as dops

    torch.manual_seed(rank)  # different initial parameters: DDP broadcasts rank 0's
    net = _Net(importance)
    ddp = DDP(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    init = [p.detach().clone() for p in net.parameters()]  # after DDP's broadcast

    data_gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    drop_gen = torch.Generator().manual_seed(200 + rank)  # different drops per rank
    drops = []

    for step in range(STEPS):
        x = torch.randn(4, 3, 6, 6, generator=data_gen)
        y = torch.randint(0, 4, (4, 6, 6), generator=data_gen)
        t = dops.progress(step + 2, STEPS + 2)  # p > 0 from the first step
        out = ddp(x, y, t, drop_gen)
        drops.append(out.drop)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    torch.save({"params": [p.detach() for p in net.parameters()], "init": init, "drops": torch.stack(drops)}, path)


class _Net(torch.nn.Module):
    """A tiny backbone + DropClassHead; the training call goes through DDP's forward."""

    def __init__(self, importance: str):
        super().__init__()
        import debias_ops as dops
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.head = dops.DropClassHead(8, 4, importance=importance, alpha=10.0)

    def forward(self, x, y, t, gen):
        return self.head(self.backbone(x), y, t, generator=gen)


@pytest.mark.timeout(600)  # a hung rendezvous fails instead of eating CI's time (needs pytest-timeout)
def test_ddp_gloo_two_ranks_identical_parameters(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    run_gloo(_train_all, tmp_path)
    for importance in IMPORTANCES:
        check_ranks_agree(torch.load(tmp_path / f"{importance}_rank0.pt"),
                          torch.load(tmp_path / f"{importance}_rank1.pt"), importance)
