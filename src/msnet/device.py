"""Where computation runs: device choice, seeding, CPU threads for small work, and data-parallel helpers for
`torchrun --nproc-per-node N -m msnet ...` (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import contextlib
import os
import random
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


_threads_lock = threading.Lock()
_threads_state = {"depth": 0, "saved": 1}


@contextlib.contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block with one intra-op CPU thread, then restore the previous count.

    For small work (one study through MS-Net: a few ms on one core) a second thread gains nothing,
    and on a shared machine each parallel region can wait a scheduler time slice for it (measured:
    a 1 ms forward pass took 0.2-0.3 s on two busy cores). Nested and concurrent uses are safe: the
    first to enter sets one thread, the last to leave restores the count.

    >>> before = torch.get_num_threads()
    >>> with one_thread():
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    if not enabled:
        yield
        return
    with _threads_lock:
        if _threads_state["depth"] == 0:
            _threads_state["saved"] = torch.get_num_threads()
            if _threads_state["saved"] != 1:
                torch.set_num_threads(1)
        _threads_state["depth"] += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_state["depth"] -= 1
            if _threads_state["depth"] == 0 and _threads_state["saved"] != 1:
                torch.set_num_threads(_threads_state["saved"])


@contextmanager
def reproducible(seed: int, threads: int) -> Iterator[None]:
    """Seeded python/numpy/torch RNGs, a fixed number of CPU threads and torch's deterministic algorithms
    for the block; the previous thread count and algorithm settings come back afterwards.

    With the thread count fixed, a run does not depend on how many cores the machine has or has free.
    Identical numbers still need the same CPU kind: BLAS/oneDNN kernels differ between instruction sets.

    >>> with reproducible(0, threads=1):
    ...     torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    (1, True)
    """
    old = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.mkldnn.deterministic)
    torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.mkldnn.deterministic = True
    seed_everything(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old[0])
        torch.use_deterministic_algorithms(old[1], warn_only=old[2])
        torch.backends.mkldnn.deterministic = old[3]


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment, once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return world()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    return world()[0] == 0


def channels_last(x: torch.Tensor, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
    """A batch of images on ``device``, channels last: the layout the CNN backbones are kept in, whose
    convolutions run faster so (EfficientNet-Lite0 on a 2-core CPU: 1.6-1.9x, training and inference)."""
    return x.to(device, non_blocking=non_blocking).contiguous(memory_format=torch.channels_last)
