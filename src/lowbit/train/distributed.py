"""What lowbit.train's loop needs to run data-parallel (FSDP2) under ``torchrun``: each rank trains
on its slice of every global batch, the reported loss and tokens are reduced over the ranks, only
rank 0 shows progress and writes the training state (gathered in full from the shards), and a
resumed run loads it on every rank."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist


class DataParallel:
    """The ranks of the default process group (``torch.distributed`` initialized), or of ``group``."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("DataParallel needs torch.distributed initialized first (init_distributed or torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """This rank's rows of a global batch: contiguous slices, rank ``r`` the ``r``-th (as a
        DistributedSampler without shuffling), so K ranks see the batch one process sees."""
        out = {}
        for name, t in batch.items():
            if t.shape[0] % self.world:
                raise ValueError(f"a global batch of {t.shape[0]} sequences does not split over {self.world} "
                                 f"processes; use a batch size that is a multiple of {self.world}")
            n = t.shape[0] // self.world
            out[name] = t[self.rank * n: (self.rank + 1) * n]
        return out

    def reduce_step(self, loss_sum: float, tokens: int, device: torch.device) -> Tuple[float, int]:
        """(mean of the ranks' losses, total tokens): one all-reduce."""
        t = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64, device=device)
        dist.all_reduce(t, group=self.group)
        return float(t[0]) / self.world, int(t[1])

    def full_state(self, model, opt) -> Tuple[dict, dict]:
        """The model's and optimizer's state dicts gathered in full on the CPU (every rank calls)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)

    def load_full_state(self, model, opt, model_state: dict, opt_state: dict) -> None:
        """Shard full state dicts (every rank holds them) into the model and optimizer."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, model_state, options=options)
        set_optimizer_state_dict(model, opt, opt_state, options=options)

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def init_distributed(device: Optional[str] = None, timeout_s: float = 600.0) -> Tuple[DataParallel, torch.device]:
    """Join the process group ``torchrun`` describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment; a lone process without them is a group of one): NCCL on CUDA, gloo on the CPU.
    Returns the group and this rank's device (cuda:LOCAL_RANK on CUDA)."""
    cuda = torch.cuda.is_available() if device in (None, "auto") else str(device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA device here")
    if not dist.is_initialized():
        if "RANK" not in os.environ:   # a single process: a group of one on a free port
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(port)})
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return DataParallel(), dev
