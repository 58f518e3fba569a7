"""torch.distributed plumbing in one place: the process group from torchrun's environment.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT or a c10d rendezvous); without
them the trainer runs as a single process with no process group at all. NCCL serves CUDA devices,
gloo the CPU: the only backend switch in the code base.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_free import environment


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints' shared parts and MLflow records."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(requested_device: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Join torchrun's process group if launched by torchrun, else run single-process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = environment.resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = attempt_store(world_size, timeout)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                device_id=device if device.type == "cuda" else None,
                                **(dict(store=store, rank=rank, world_size=world_size)
                                   if store is not None else {}))
    return DistInfo(rank, world_size, local_rank, device)


def attempt_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """torchrun's store, with keys private to this restart attempt (None: not under torchrun).

    With the c10d rendezvous, torchrun's workers share the agent's TCPStore across restarts.
    Process-group set-up keys are not namespaced per attempt, so after `--max-restarts` kicks in
    the new workers can read the dead workers' addresses and hang in gloo/NCCL set-up (seen
    here with torch 2.14). Prefixing with TORCHELASTIC_RESTART_COUNT, as torch's own env://
    handler once did, gives every attempt fresh keys.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"dist_free/attempt_{attempt}/", store)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Exact sums across ranks (counts are summed as float64 so no integer is rounded)."""
    if dist.is_initialized():
        values = values.double()
        dist.all_reduce(values)
    return values


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP syncs them at the start of each forward, and every rank then updates its own copy, so
    after training they differ slightly; evaluating every val shard with rank 0's makes the
    all-reduced accuracy that of the model the checkpoint holds.
    """
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def gather_to_main(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's same-shaped tensor, on rank 0 only (others get []): checkpointing per-rank
    perturbation buffers without every rank holding world_size copies."""
    if not dist.is_initialized():
        return [t]
    main = dist.get_rank() == 0
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())] if main else None
    dist.gather(t.contiguous(), out, dst=0)
    return out or []


def gather_objects_to_main(obj) -> list:
    """Every rank's `obj` (small: RNG states, a loader's position), on rank 0 only (others get
    []). torch pickles them between this job's own ranks; nothing here is read from a file."""
    if not dist.is_initialized():
        return [obj]
    main = dist.get_rank() == 0
    out = [None] * dist.get_world_size() if main else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
