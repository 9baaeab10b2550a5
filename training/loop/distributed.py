"""One interface over Horovod, torch.distributed and a single process.

`detect()` picks the backend from the launcher's environment: `horovodrun` sets
HOROVOD_RANK, `torchrun` sets RANK/WORLD_SIZE, no launcher means one process.
"""
from __future__ import annotations

import os
import sys

import torch


class Single:
    name = "single"
    rank, size, local_rank = 0, 1, 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model, optimizer):
        """Return (model to call, optimizer to step); the model's parameters are unchanged."""
        return model, optimizer

    def broadcast(self, model, optimizer) -> None:
        pass

    def sync_buffers(self, model) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics), which each rank
        otherwise updates from its own batches: evaluation then uses one model on every
        shard, and rank 0's checkpoint holds the whole state."""

    def allreduce_mean(self, value: float) -> float:
        return value

    def allreduce_min(self, value: int) -> int:
        return value

    def allgather_object(self, obj) -> list:
        return [obj]

    def shutdown(self) -> None:
        pass


class Horovod(Single):
    """Horovod over Gloo (CPU) or NCCL (GPU), as built by install/horovod."""

    name = "horovod"

    def __init__(self):
        import horovod.torch as hvd

        hvd.init()
        self.hvd = hvd
        self.rank, self.size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()

    def wrap(self, model, optimizer):
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        return model, self.hvd.DistributedOptimizer(optimizer, named_parameters=trainable)

    def broadcast(self, model, optimizer) -> None:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def sync_buffers(self, model) -> None:
        self.hvd.broadcast_parameters(list(model.named_buffers()), root_rank=0)

    def allreduce_mean(self, value: float) -> float:
        return float(self.hvd.allreduce(torch.tensor(float(value)), op=self.hvd.Average))

    def allreduce_min(self, value: int) -> int:
        return int(self.hvd.allreduce(torch.tensor(int(value)), op=self.hvd.Min))

    def allgather_object(self, obj) -> list:
        return self.hvd.allgather_object(obj)

    def shutdown(self) -> None:
        self.hvd.shutdown()


class TorchDistributed(Single):
    """torch.distributed with DDP: Gloo on CPU, NCCL on GPU."""

    name = "torch"

    def __init__(self):
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        self.dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))

    def wrap(self, model, optimizer):
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=device_ids), optimizer

    def broadcast(self, model, optimizer) -> None:
        # DDP broadcasts parameters and buffers from rank 0 when it wraps the model; the
        # optimizer state (non-empty after --resume) is sent here.
        state = [optimizer.state_dict() if self.rank == 0 else None]
        self.dist.broadcast_object_list(state, src=0)
        optimizer.load_state_dict(state[0])

    def sync_buffers(self, model) -> None:
        for buffer in model.buffers():
            self.dist.broadcast(buffer, src=0)

    def _reduce(self, value, op, dtype):
        tensor = torch.tensor(value, dtype=dtype)
        self.dist.all_reduce(tensor, op=op)
        return tensor

    def allreduce_mean(self, value: float) -> float:
        return float(self._reduce(float(value), self.dist.ReduceOp.SUM, torch.float64)) / self.size

    def allreduce_min(self, value: int) -> int:
        return int(self._reduce(int(value), self.dist.ReduceOp.MIN, torch.int64))

    def allgather_object(self, obj) -> list:
        gathered = [None] * self.size
        self.dist.all_gather_object(gathered, obj)
        return gathered

    def shutdown(self) -> None:
        self.dist.barrier()
        self.dist.destroy_process_group()
        # Gloo sometimes aborts in interpreter teardown after a clean shutdown
        # ("terminate called without an active exception"); leave before it can.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def detect(requested: str = "auto") -> Single:
    if requested == "auto":
        if "HOROVOD_RANK" in os.environ:
            requested = "horovod"
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            requested = "torch"
        else:
            requested = "single"
    backends = {"horovod": Horovod, "torch": TorchDistributed, "single": Single}
    if requested not in backends:
        raise ValueError(f"unknown backend {requested!r}; choose auto, {', '.join(backends)}")
    return backends[requested]()
