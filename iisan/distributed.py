"""Data-parallel training under ``torchrun``: process group, DDP wrapping, sharding and gathering.

Without torchrun's environment (``RANK``, ``WORLD_SIZE``) everything here is a no-op and a run is the
plain single-process run. Under torchrun every process holds the whole data set and the whole model;
it trains on its own shard of users (``data.epochs.shard_users``) and DistributedDataParallel averages gradients.
Evaluation splits whole evaluation chunks across ranks (``chunk_block``) and gathers the per-user ranks
in order, so it computes exactly what a single process computes for the same weights.

Collectives use tensors only (never ``*_object`` collectives, which pickle).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import os
import signal
import threading
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from .devices import resolve_device
from .errors import STOP_SIGNALS, ConfigError
from .once import in_a_launch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """Where this process stands; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: not distributed

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def comm_device(self) -> torch.device:
        """NCCL moves only CUDA tensors; gloo moves CPU tensors."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = Dist()


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets the env:// variables)."""
    return in_a_launch()


def main_process() -> bool:
    """Whether this process is rank 0 of a launch, or not launched at all: the one that prints."""
    return not launched() or os.environ["RANK"] == "0"


def launched_processes() -> int:
    """How many processes the launcher started (1 without one)."""
    return launch_env()["WORLD_SIZE"] if launched() else 1


def launch_env(local: bool = False) -> dict[str, int]:
    """The launcher's RANK and WORLD_SIZE (and LOCAL_RANK with ``local``), refused in one line when one is missing or
    is not a count that fits the others (a hand-set environment)."""
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK")[:3 if local else 2]:
        text = os.environ.get(key)
        if text is None:
            raise ConfigError(f"RANK and WORLD_SIZE are set but {key} is not: set it too ({key} of this process) or "
                              "launch with torchrun, which sets all three")
        least = 1 if key == "WORLD_SIZE" else 0
        if not text.strip().isdecimal() or int(text.strip()) < least:
            raise ConfigError(f"{key}={text!r} in the environment: expected a whole number of at least {least} "
                              "(torchrun sets RANK, WORLD_SIZE and LOCAL_RANK)")
        values[key] = int(text.strip())  # (strip() takes more than int() does: '0\x1f')
    if values["RANK"] >= values["WORLD_SIZE"]:
        raise ConfigError(f"RANK={values['RANK']} in the environment is not below WORLD_SIZE={values['WORLD_SIZE']} "
                          "(ranks count from 0)")
    return values


def setup(device_name: str) -> tuple[Dist, torch.device, bool]:
    """The process group (joined, or created: the third value says so) and this rank's device.

    On CUDA each process takes the GPU of its ``LOCAL_RANK`` and talks NCCL; on CPU, gloo."""
    if not launched():
        return SINGLE, resolve_device(device_name), False
    rank, world, local = launch_env(local=True).values()
    if device_name.startswith("cuda:"):
        raise ConfigError(f"device={device_name} under torchrun: use --device cuda (each process takes the "
                          "GPU of its LOCAL_RANK) or limit GPUs with CUDA_VISIBLE_DEVICES")
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    created = not torch_dist.is_initialized()
    if created:
        if missing := [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]:
            raise ConfigError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: launch with torchrun, "
                              "which sets them, or unset RANK and WORLD_SIZE for a run of one process")
        if rank == 0:  # (a launch some process never joins waits here)
            log.info("joining the %d processes of this launch at %s:%s", world, os.environ["MASTER_ADDR"],
                     os.environ["MASTER_PORT"])
        backend = "nccl" if device.type == "cuda" else "gloo"
        # (torch's wait never returns to Python, whose handlers would run then; a timer's thread runs)
        with signals_end_the_process(), said_while_waiting(rank, world, backend):
            torch_dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    dist = Dist(rank, world, local, torch_dist.get_backend())
    if dist.backend == "nccl" and device.type != "cuda":
        raise ConfigError("the process group talks NCCL but device=cpu; use --device cuda")
    return dist, device, created


def joined() -> Dist:
    """The process group this process joined (``setup``), or a single process where it joined none."""
    if not launched() or not torch_dist.is_available() or not torch_dist.is_initialized():
        return SINGLE
    rank, world, local = launch_env(local=True).values()
    return Dist(rank, world, local, torch_dist.get_backend())


WAIT_SAID_AFTER = 60.0  # seconds a process waits for the others of its launch before it says so


@contextlib.contextmanager
def said_while_waiting(rank: int, world: int, backend: str):
    """A warning from this process once it has waited ``WAIT_SAID_AFTER`` seconds for the others of its launch to
    join: which rank it is and where it waits. Rank 0 alone says it joins, and a rank whose rank 0 never started
    (a launch by hand, or by a scheduler, of one process a rank) said nothing until ``backend``'s timeout."""
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    constants = torch_dist.constants
    limit = (getattr(constants, "default_pg_nccl_timeout", None) if backend == "nccl" else None) or \
        constants.default_pg_timeout
    hosts = "it hosts" if rank == 0 else "rank 0 hosts"
    timer = threading.Timer(WAIT_SAID_AFTER, log.warning, args=(
        "rank %d of %d has waited %g s for the other processes of its launch at %s (%s it): one that never started "
        "keeps every other waiting until torch's timeout (%.0f min); launch all %d with the same MASTER_ADDR, "
        "MASTER_PORT and WORLD_SIZE, or stop this one (Ctrl-C)", rank, world, WAIT_SAID_AFTER, where, hosts,
        limit.total_seconds() / 60, world))
    timer.daemon = True  # (a process that ends while it waits is not held by it)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@contextlib.contextmanager
def signals_end_the_process():
    """Ctrl-C and the stop signals (``errors.STOP_SIGNALS``) end the process at once, as they do by default
    (nothing is written yet); their handlers are put back after. Outside the main thread, as it is."""
    stops = [signal.SIGINT, *(getattr(signal, name) for name in STOP_SIGNALS)]
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in stops} if main else {}
    # (one ignored when the command started stays ignored; None: a handler from outside Python, left alone)
    changed = {sig: handler for sig, handler in previous.items() if handler not in (signal.SIG_IGN, None)}
    for sig in changed:
        signal.signal(sig, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in changed.items():
            signal.signal(sig, handler)


def teardown(finished: bool = True, error: BaseException | None = None) -> None:
    """Leave the process group. After a ``finished`` run every rank first waits for the others: a rank that
    closes its connections while a peer's are still busy can abort that peer at exit (seen, rarely,
    with gloo). After a failure no one waits (a peer may be gone). Model wrappers (DDP) are let go first:
    the last one to go destroys the group, and one freed later does so holding the GIL, which gloo's threads
    may be waiting for (a rank that never exits). So the frames of ``error``'s traceback (the failure in
    flight), which hold what they held, let go of their variables, and wrappers held only in reference cycles
    are collected."""
    for err in chained(error):
        traceback.clear_frames(err.__traceback__)  # (the frame still running is left as it is)
    gc.collect()
    if torch_dist.is_initialized():
        if finished:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def chained(error: BaseException | None) -> list[BaseException]:
    """``error`` and the errors it was raised from or during, each once (None: none)."""
    found: list[BaseException] = []
    while error is not None and all(error is not e for e in found):
        found.append(error)
        error = error.__cause__ or error.__context__
    return found


def wrap(model: torch.nn.Module, dist: Dist, device: torch.device, find_unused: bool) -> torch.nn.Module:
    """DDP around the model (the model itself when not distributed).

    ``broadcast_buffers=False``: the only buffers are constants (log-popularity, cached state tables of
    hundreds of MB), identical on every rank, so re-broadcasting them before every forward is waste."""
    if not dist.enabled:
        return model
    # torch 2.13 renamed the switch (and deprecated the old name); older releases know only the old one.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    if device.type != "cuda":
        return DistributedDataParallel(model, find_unused_parameters=find_unused, **no_sync)
    # Built on a side stream, as PyTorch's CUDA-graph notes ask of a DDP model whose whole step may be
    # captured (compile=cudagraph); harmless otherwise.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        ddp = DistributedDataParallel(model, device_ids=[device.index], find_unused_parameters=find_unused, **no_sync)
    torch.cuda.current_stream(device).wait_stream(side)
    return ddp


# --------------------------------------------------------------------------------------------------
# splitting work


def chunk_block(rows: int, chunk: int, dist: Dist) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of this rank: a contiguous block of whole ``chunk``-sized chunks.

    Whole chunks mean each rank computes exactly the batches a single process would (same shapes, so
    the same kernels and the same bits); contiguous blocks in rank order mean gathering restores order."""
    chunks = -(-rows // chunk)
    first, last = dist.rank * chunks // dist.world_size, (dist.rank + 1) * chunks // dist.world_size
    return min(first * chunk, rows), min(last * chunk, rows)


# --------------------------------------------------------------------------------------------------
# collectives (tensors only)


def gather_rows(local: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Concatenate every rank's ``local`` (rows may differ in number) in rank order, on every rank.

    Ranks are padded to the longest block for the transfer and the padding is cut off again, so no row
    is ever counted twice."""
    if not dist.enabled:
        return local
    comm = dist.comm_device()
    size = torch.tensor([len(local)], device=comm)
    sizes = [torch.zeros_like(size) for _ in range(dist.world_size)]
    torch_dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=comm)
    padded[: len(local)] = local.to(comm)
    parts = [torch.empty_like(padded) for _ in range(dist.world_size)]
    torch_dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)]).to(local.device)


def gather_same(local: torch.Tensor, dist: Dist) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor (e.g. RNG states), as CPU tensors in rank order."""
    if not dist.enabled:
        return [local.cpu()]
    comm = dist.comm_device()
    parts = [torch.empty_like(local, device=comm) for _ in range(dist.world_size)]
    torch_dist.all_gather(parts, local.to(comm))
    return [p.cpu() for p in parts]


def mean_over_ranks(values: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Average over ranks (SUM then divide: gloo has no AVG); NaN on any rank makes NaN everywhere."""
    if not dist.enabled:
        return values
    total = values.to(dist.comm_device(), copy=True)  # all_reduce sums in place: never into the caller's values
    torch_dist.all_reduce(total)
    return (total / dist.world_size).to(values.device)


def any_rank(flag: bool, dist: Dist) -> bool:
    """True on every rank when ``flag`` is true on some rank: ranks must take the same branch."""
    if not dist.enabled:
        return flag
    value = torch.tensor([int(flag)], device=dist.comm_device())
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_text(text: str, dist: Dist, source: int = 0) -> str:
    """The string of rank ``source`` (by default rank 0's: run folder names, decisions about which checkpoint to
    load) on every rank."""
    if not dist.enabled:
        return text
    comm, sends = dist.comm_device(), dist.rank == source
    data = torch.tensor(list(text.encode()) if sends else [], dtype=torch.uint8)
    size = torch.tensor([len(data)], device=comm)
    torch_dist.broadcast(size, source)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=comm)
    if sends:
        buffer.copy_(data.to(comm))
    torch_dist.broadcast(buffer, source)
    return bytes(buffer.cpu().tolist()).decode()
