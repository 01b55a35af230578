"""Processes of the FSDP tests (tests/test_lowp_fsdp.py): a tiny Llama trained by lowbit.train's loop
under FSDP2 on the gloo backend, each rank writing what the test compares to ``OUT/rank{r}.pt``."""
import socket
import time
from datetime import timedelta

import torch

BATCH, SEQ = 4, 32


def batches(k: int) -> dict:
    """The global batch of micro-step ``k``: random byte tokens, a pure function of ``k``."""
    return {"input_ids": torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(k))}


def split_batches(parts: int):
    """The same data one process sees as ``parts`` micro-batches per step (grad_accum = parts)."""
    return lambda k: {n: t.chunk(parts)[k % parts] for n, t in batches(k // parts).items()}


def tiny_model(recipe):
    from _tiny_lm import byte_llama
    from lowbit.lowp import prepare_lowp

    model = byte_llama(seed=0).train()
    if recipe:
        prepare_lowp(model, recipe, block=64)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world: int, timeout_s: float, *args, fork: bool = True) -> None:
    """``fn(rank, world, port, *args)`` in ``world`` processes, forked where the platform can (the
    children then skip importing torch and transformers again; CUDA needs ``fork=False``); fails
    after ``timeout_s``."""
    import multiprocessing

    import torch.multiprocessing as mp

    method = "fork" if fork and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "fork":   # import once, here, for every child
        import lowbit.lowp.fsdp  # noqa: F401
        import lowbit.train.loop  # noqa: F401
        tiny_model(None)
    ctx = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=False, start_method=method)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"the {world} FSDP processes did not finish in {timeout_s:.0f} s")


def _init(rank: int, world: int, port: int, device: str = "cpu") -> torch.device:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=60))
    return torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")


def train_configs(rank: int, world: int, port: int, out: str, configs: list, steps: int, device: str = "cpu") -> None:
    """For each (recipe, gather): the loss curve of ``steps`` sharded steps and, after them, the
    first block's gathered q_proj weight beside the full master weight it came from."""
    import torch.distributed as dist

    from lowbit.lowp.fsdp import shard_model
    from lowbit.train.distributed import DataParallel
    from lowbit.train.loop import TrainConfig, train
    from lowbit.train.objectives import causal_lm_objective

    dev = _init(rank, world, port, device)
    res = {}
    for recipe, gather in configs:
        model = shard_model(tiny_model(recipe).to(dev), gather=gather)
        cfg = TrainConfig(steps=steps, lr=1e-3, grad_clip=None, seed=0)
        r = train(model, batches, causal_lm_objective("ce"), {"weights": list(model.parameters())}, cfg,
                  progress=False, parallel=DataParallel())
        block = model.model.layers[0]
        master = block.self_attn.q_proj.weight.full_tensor()
        block.unshard()
        w = block.self_attn.q_proj.weight
        gathered = (w._codes.clone().cpu(), w._scales.clone().cpu(), w._gain) if hasattr(w, "_codes") else None
        block.reshard()
        res[(recipe, gather)] = {"losses": [h["loss"] for h in r.history], "master": master.cpu(), "gathered": gathered,
                                 "gathered_type": type(w).__name__}
    torch.save(res, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def train_resume(rank: int, world: int, port: int, out: str, recipe: str, gather: str, steps: int, stop: int) -> None:
    """The loss curve of ``steps`` sharded steps straight through, and of a run saving its state
    every step (rank 0 writes), interrupted in step ``stop`` and resumed by fresh sharded models."""
    import torch.distributed as dist

    from lowbit.lowp.fsdp import shard_model
    from lowbit.train.distributed import DataParallel
    from lowbit.train.loop import TrainConfig, train
    from lowbit.train.objectives import causal_lm_objective

    _init(rank, world, port)
    cfg = TrainConfig(steps=steps, lr=1e-3, save_every=1, seed=0)

    def run(state_dir=None, on_step=None):
        model = shard_model(tiny_model(recipe), gather=gather)
        return train(model, batches, causal_lm_objective("ce"), {"weights": list(model.parameters())}, cfg,
                     progress=False, parallel=DataParallel(), state_dir=state_dir, on_step=on_step)

    def interrupt(rec):
        if rec["step"] == stop:
            raise KeyboardInterrupt

    straight = run()
    try:
        run(f"{out}/state", interrupt)
    except KeyboardInterrupt:
        pass
    resumed = run(f"{out}/state")
    torch.save({"straight": [h["loss"] for h in straight.history], "resumed": [h["loss"] for h in resumed.history],
                "resumed_from": resumed.resumed_from}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def lptrain_cli(rank: int, world: int, port: int, argv: list) -> None:
    """``lowbit lptrain ... --fsdp`` as torchrun would start it: the rank in the environment."""
    import os

    from lowbit.cli import main

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if main(argv) != 0:
        raise SystemExit(f"rank {rank}: lptrain failed")
