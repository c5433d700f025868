"""Data-parallel runs on torch.distributed, launched by torchrun.

``torchrun --nproc_per_node=N -m reclip adapt ...`` starts N copies of the ordinary command;
torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR / MASTER_PORT) tells each
copy where it stands. ``setup`` turns that environment into a process group (``env://``): gloo
for ``--device cpu``, NCCL with each rank on ``cuda:LOCAL_RANK`` otherwise. Without that
environment (or with WORLD_SIZE 1) nothing is initialised and ``current()`` is the trivial
single-process ``World``: a plain run pays for nothing here.

What a ``World`` offers ReCLIP is exactly what data parallelism needs and nothing home-made:
contiguous shards (rank r of W gets items [r*n//W, (r+1)*n//W), so no item is duplicated or
dropped whatever n is), an all-gather of uneven row blocks back into dataset order (padded to
the largest block, trimmed after), a broadcast of rank 0's labels, barriers, and the
bookkeeping of report.json (seconds spent in these collectives, per-rank throughput).
DistributedDataParallel does the gradient all-reduce; it overlaps the backward pass and is
not counted in ``collective_seconds``.

Faults: a rank that raises exits non-zero; torchrun then stops the other ranks of the group
(and, with ``--max-restarts``, starts them all again: ``--resume`` continues from the last
checkpoint). Without torchrun's agent a rank blocked in a collective gives up after the
process group's timeout (torch's default: 30 minutes for gloo, 10 for NCCL).
"""
from __future__ import annotations

import contextlib
import gc
import os
import socket
import time
from typing import Any, Callable

import numpy as np
import torch


def requested_world() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's environment; (1, 0, 0) without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError("WORLD_SIZE / RANK / LOCAL_RANK: not integers; launch with torchrun") from None
    return world, rank, local


def shard(n: int, world: int, rank: int) -> range:
    """The items of rank `rank`: a contiguous block; the blocks of all ranks tile range(n)."""
    return range(rank * n // world, (rank + 1) * n // world)


def split(count: int, world: int, rank: int) -> slice:
    """Rank `rank`'s contiguous part of a global batch of `count` items (some ranks get one
    item more when `count` is not divisible by `world`; a rank may get none)."""
    part = shard(count, world, rank)
    return slice(part.start, part.stop)


class World:
    """One process's view of the run: rank, world size and the collectives ReCLIP uses, each
    timed. The single-process World (size 1) does no communication at all."""

    def __init__(self, size: int = 1, rank: int = 0, local_rank: int = 0,
                 device: torch.device | None = None, backend: str | None = None) -> None:
        self.size, self.rank, self.local_rank = size, rank, local_rank
        self.device = device or torch.device("cpu")  # where NCCL wants collective tensors
        self.backend = backend
        self.collective_seconds = 0.0
        self.collective_calls = 0
        #: this rank's work, for report.json: images and wall seconds of encoding and
        #: training, and the wall seconds of the pseudo labels (the sharded label propagation,
        #: its own collectives and rank 0's solve included); of the training, the steps and
        #: wall seconds of each side (ReCLIP-T's grow with the classes, ReCLIP-V's with the
        #: batch)
        self.work = {"encode_images": 0, "encode_seconds": 0.0,
                     "train_images": 0, "train_seconds": 0.0, "pseudo_label_seconds": 0.0,
                     "text_steps": 0, "text_step_seconds": 0.0,
                     "visual_steps": 0, "visual_step_seconds": 0.0}

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def _timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":  # NCCL calls return before the transfer ends
                torch.cuda.synchronize(self.device)
            self.collective_seconds += time.perf_counter() - start
            self.collective_calls += 1

    def shard(self, n: int) -> range:
        return shard(n, self.size, self.rank)

    def shards(self, n: int) -> list[range]:
        """Every rank's block of n items, in rank order."""
        return [shard(n, self.size, r) for r in range(self.size)]

    def gather_rows(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's `local` rows (rank r holds counts[r] of them), concatenated in rank
        order on every rank. Blocks are padded to the largest so that one all_gather of
        equal-sized tensors does it (uneven blocks are not allowed on every backend)."""
        if not self.active:
            return local
        import torch.distributed as dist

        width = max(counts)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: len(local)] = local
        blocks = [torch.empty_like(padded) for _ in range(self.size)]
        with self._timed():
            dist.all_gather(blocks, padded)
        return torch.cat([b[:c] for b, c in zip(blocks, counts)])

    def all_rows(self, local: torch.Tensor) -> torch.Tensor:
        """(world_size, *local.shape): row r is rank r's `local`, on every rank, through an
        all-reduce that autograd differentiates (its backward sums the ranks' gradients of
        each row back to the rank that owns it). Untimed: SHOT calls it every step with m
        values, and timing would synchronise the device each time."""
        if not self.active:
            return local[None]
        rows = [local if r == self.rank else torch.zeros_like(local) for r in range(self.size)]
        return _SummedOverRanks.apply(torch.stack(rows))

    def labels_of_rank0(self, compute: Callable[[], np.ndarray], n: int) -> np.ndarray:
        """The n int64 labels of `compute()`, run on rank 0 only and broadcast to every rank
        (in a single process, simply its result): every rank then trains on the same labels,
        which separate computations need not give bit for bit."""
        if not self.active:
            return compute()
        import torch.distributed as dist

        t = (torch.from_numpy(np.ascontiguousarray(compute(), dtype=np.int64)).to(self.device)
             if self.main else torch.empty(n, dtype=torch.int64, device=self.device))
        with self._timed():
            dist.broadcast(t, src=0)
        return t.cpu().numpy()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        with self._timed():
            dist.all_gather_object(out, obj)
        return out

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a tensor on this rank's device (in place)."""
        if not self.active:
            return value
        import torch.distributed as dist

        with self._timed():
            dist.all_reduce(value)
        return value

    def min(self, value: torch.Tensor) -> torch.Tensor:
        """The minimum over ranks of a tensor on this rank's device (in place)."""
        if not self.active:
            return value
        import torch.distributed as dist

        with self._timed():
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value

    def barrier(self) -> None:
        if not self.active:
            return
        import torch.distributed as dist

        with self._timed():
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def report(self) -> dict[str, Any]:
        """What report.json records of the run's ranks (a collective: every rank calls it)."""
        mine = {"rank": self.rank, "host": socket.gethostname(), **self.work,
                "collective_seconds": round(self.collective_seconds, 3)}
        for kind in ("encode", "train"):
            seconds = self.work[f"{kind}_seconds"]
            mine[f"{kind}_images_per_s"] = (round(self.work[f"{kind}_images"] / seconds, 2)
                                            if seconds > 0 else None)
            mine[f"{kind}_seconds"] = round(seconds, 3)
        for kind in ("pseudo_label", "text_step", "visual_step"):
            mine[f"{kind}_seconds"] = round(self.work[f"{kind}_seconds"], 3)
        ranks = self.gather_objects(mine)
        return {"world_size": self.size, "backend": self.backend,
                "collective_seconds": round(self.collective_seconds, 3),
                "collective_calls": self.collective_calls,
                "collectives_note": "wall time of the all_gather, broadcast, all_reduce and "
                                    "barrier calls (rank 0's above, each rank's in ranks, "
                                    "waiting for slower ranks included); DDP's gradient "
                                    "all-reduce overlaps the backward pass and is not counted, "
                                    "nor is SHOT's per-step sum of m values, and the sharded "
                                    "label propagation's own collectives are in each rank's "
                                    "pseudo_label_seconds",
                "ranks": ranks}


class _SummedOverRanks(torch.autograd.Function):
    """The sum over the ranks of a tensor, differentiable: the gradient of every rank's input
    is the sum of the ranks' gradients of the output (each rank's output is the same sum).
    torch's own torch.distributed.nn.functional.all_reduce is deprecated, and its functional
    successor has no backward. The backward runs near the top of the graph, before any
    parameter has a gradient, so on every rank it is issued before DDP's bucket all-reduces
    (the collectives of one group must come in one order on all ranks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


_WORLD = World()


def current() -> World:
    """The World of this process: the one ``setup`` made, else the single-process one."""
    return _WORLD


def setup(device: str, name: str = "--device") -> str:
    """Join torchrun's process group when its environment asks for more than one process;
    returns the device this rank runs on (`device` itself for a single process).

    ``cpu`` runs on gloo; ``auto`` (with CUDA present) and ``cuda`` run on NCCL with this rank
    on ``cuda:LOCAL_RANK``. ``cuda:N`` names one device for every rank and is refused, as is
    ``auto`` or ``cuda`` without enough local devices.
    """
    global _WORLD
    size, rank, local = requested_world()
    if size <= 1:
        return device
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1: this torch has no torch.distributed")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cpu" or (device == "auto" and not count):
        backend, where = "gloo", torch.device("cpu")
    elif device in ("auto", "cuda"):
        if local >= count:
            raise ValueError(f"{name}: local rank {local} needs cuda:{local}, but this node has "
                             f"{count} CUDA device{'s' if count != 1 else ''}; start at most "
                             f"{count} processes per node")
        backend, where = "nccl", torch.device("cuda", local)
        torch.cuda.set_device(where)
    elif device.startswith("cuda:"):
        raise ValueError(f"{name}: {device!r} names one GPU for all {size} processes; under "
                         "torchrun use --device cuda (each process takes cuda:LOCAL_RANK)")
    else:
        raise ValueError(f"{name}: expected auto, cpu or cuda under torchrun, got {device!r}")
    if not dist.is_initialized():
        # torch's env:// rendezvous, with the group's keys under a prefix naming the attempt:
        # torchrun's agent keeps one store across --max-restarts, and a restarted group
        # would otherwise read the dead processes' addresses from the previous attempt
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=size))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"reclip/attempt-{attempt}", store),
                                world_size=size, rank=rank,
                                **({"device_id": where} if backend == "nccl" else {}))
    _WORLD = World(size, rank, local, where, backend)
    return "cpu" if backend == "gloo" else str(where)


def shutdown(barrier: bool = True) -> None:
    """Leave the process group (at exit of a distributed run; nothing otherwise). With
    `barrier`, first wait until every rank is here: only for a run all ranks finished, since
    after an error one rank may never arrive."""
    global _WORLD
    if _WORLD.active:
        import torch.distributed as dist

        if dist.is_initialized():
            # every rank is past its last collective before any rank closes its connections,
            # and what still holds the group (a DDP wrapper in a cycle) is freed while the
            # group exists; otherwise gloo may abort one rank at exit
            if barrier:
                dist.barrier()
            gc.collect()
            dist.destroy_process_group()
        _WORLD = World()
