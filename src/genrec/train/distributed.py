"""Multi-process training with ``torchrun`` (DDP): gloo on CPU, NCCL on GPU.

    # one machine, 2 processes (CPU or 2 GPUs)
    torchrun --standalone --nproc_per_node=2 -m genrec.cli train configs/ml-1m/hstu.toml --out runs/ddp
    # two machines, 4 GPUs each (run on both, with the first machine's address)
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 --master_addr=10.0.0.1 --master_port=29500 \\
        -m genrec.cli train configs/ml-1m/hstu.toml --out runs/ddp

``train.batch_size`` is the global batch: each step, rank r trains on its slice of the same global
batch a single process would see, the loss is normalised by the global number of predicted positions
and DDP averages the gradients, so with a deterministic loss (full softmax, no dropout) N processes
follow the single-process run up to floating-point summation order. Sampled negatives and dropout
masks are drawn per rank (each rank seeds its own stream), and in-batch negatives come from the rank's
own slice. Rank 0 validates, logs and writes checkpoints; every rank's RNG state is
saved so that resuming continues the same run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        """Sum of a number over all ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def broadcast(self, obj):
        """Rank 0's object on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's object, on every rank (in rank order)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup() -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        # gloo for CPU tensors (the small metric reductions), NCCL for CUDA tensors (the gradients);
        # a long timeout because the other ranks wait while rank 0 runs the full-ranking validation
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(hours=2))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


class DDPModel(DistributedDataParallel):
    """DDP wrapper that still exposes the model's item table for the loss."""

    def item_vectors(self) -> torch.Tensor:
        return self.module.item_vectors()
