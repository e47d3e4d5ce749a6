"""A worker for tests/test_maskmatch.py's two-process DDP check, in a module of its own so that the
spawned processes import only torch, MONAI's UNet and masksup_med.run.runtime (not the test module's
heavier imports)."""

from __future__ import annotations

import copy
import socket

import torch
import torch.distributed as dist
from monai.networks.nets import UNet
from torch import nn

from masksup_med.errors import ConfigError
from masksup_med.run.runtime import check_same_on_every_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_forwards_and_a_check(rank: int, world: int, port: int, results) -> None:
    """One DDP step whose loss uses the network twice (as MaskMatch's student does) against a plain copy."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = UNet(2, 3, 1, channels=(4, 8), strides=(2,), num_res_units=1, norm="batch")
        plain = copy.deepcopy(net)
        ddp = nn.parallel.DistributedDataParallel(net)
        g = torch.Generator().manual_seed(10 + rank)  # each process its own batches
        a, b = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
        (ddp(a).pow(2).mean() + 0.5 * ddp(b).abs().mean()).backward()
        (plain(a).pow(2).mean() + 0.5 * plain(b).abs().mean()).backward()
        for p in plain.parameters():  # what DDP should produce: the processes' gradients averaged
            dist.all_reduce(p.grad)
            p.grad /= world
        difference = max((p.grad - q.grad).abs().max().item() for p, q in zip(net.parameters(), plain.parameters()))
        check_same_on_every_process("epoch_length", 7)  # the same everywhere: nothing to say
        try:
            check_same_on_every_process("epoch_length", 3 + rank)
            refusal = ""
        except ConfigError as e:
            refusal = str(e)
        results[rank] = (difference, refusal)
    finally:
        dist.destroy_process_group()
