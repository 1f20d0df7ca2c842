"""How many threads torch takes on a CPU, chosen on purpose (every command that computes on a CPU)."""

from __future__ import annotations

import os

import torch


def pick_cpu_threads(requested: int, loader_threads: int, local_ranks: int = 1) -> int:
    """Set torch's intra-op threads for a CPU run and return the count: `requested`, or for 0 the
    cores this process may use, shared by the `local_ranks` processes of the node, less the
    loader's `loader_threads` (DALI threads or loader processes), at least 1; with 0 and
    OMP_NUM_THREADS set (by the user, or by torchrun), torch's setting is kept. torch's default
    takes every core: beside the loader's workers that oversubscribes them, and its OpenMP
    threads then wait on each other (on a shared 2-core machine a demo step went from 0.15 s to
    11-16 s; BENCHMARKS.md, "CPU threads")."""
    if requested > 0:
        threads = requested
    elif os.environ.get("OMP_NUM_THREADS"):  # the user (or torchrun) chose: keep it
        return torch.get_num_threads()
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, local_ranks) - loader_threads)
    torch.set_num_threads(threads)
    return threads
