"""Spreading IET's proxies over processes: `accelerate launch` (torch.distributed underneath) starts
the ranks, proxy k trains on rank k % world, and what the round loop must share travels by
collectives (broadcasts from each proxy's owner, sums), never by files polled on disk.

Every rank ends a round holding the same K end-of-round states in proxy order and computes the
same average, loss table and redistribution from them, so the result does not depend on the
process count. That costs K model copies per rank during aggregation, which is small next to the
activations of training at the model sizes IET is used with; a sum-reduce would save it but would
round differently from one process."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_environment(cls, device: str = "auto") -> "Ranks":
        """One plain process unless started by a launcher (accelerate launch, torchrun): then
        accelerate's PartialState joins the process group (gloo on CPU, NCCL on GPUs), one GPU per
        rank. `device` is train.device (resolve_device: an absent one is a ConfigError)."""
        from pipeline.core.config import resolve_device

        resolved = resolve_device(device)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(device=resolved)
        from accelerate import PartialState

        state = PartialState(cpu=resolved.type == "cpu")
        return cls(state.process_index, state.num_processes, state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owner(self, k: int) -> int:
        return k % self.world

    def owned(self, k_total: int) -> list[int]:
        return [k for k in range(k_total) if self.owner(k) == self.rank]

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def share_tensors(self, mine: dict[str, torch.Tensor] | None, like: dict[str, torch.Tensor], src: int
                      ) -> dict[str, torch.Tensor]:
        """Rank `src` sends `mine`; every rank returns a copy (shapes and dtypes from `like`), on the
        CPU. One flat broadcast per dtype instead of one per tensor."""
        if self.world == 1:
            return {k: v.detach().cpu().clone() for k, v in mine.items()}
        out = {}
        for dtype in sorted({v.dtype for v in like.values()}, key=str):
            keys = [k for k, v in like.items() if v.dtype == dtype]
            if self.rank == src:
                flat = torch.cat([mine[k].detach().reshape(-1) for k in keys]).to(self._comm_device())
            else:
                flat = torch.empty(sum(like[k].numel() for k in keys), dtype=dtype, device=self._comm_device())
            dist.broadcast(flat, src)
            for k, part in zip(keys, flat.cpu().split([like[k].numel() for k in keys])):
                out[k] = part.view_as(like[k]).clone()
        return out

    def share_column(self, values: np.ndarray, src: int) -> np.ndarray:
        """values from rank `src` (any shape, float64), on every rank."""
        if self.world == 1:
            return values
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(self._comm_device())
        dist.broadcast(t, src)
        return t.cpu().numpy()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (exact for integers, and for floats that only one rank holds)."""
        if self.world > 1:
            moved = t.to(self._comm_device())
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            t.copy_(moved.cpu() if t.device.type == "cpu" else moved)
        return t

    def gather(self, obj) -> list:
        """Small Python objects (curve rows, means) from every rank, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
