"""Collectives that keep every rank of a run on one decision.

A run's ranks must never disagree on what they train: the same files, the same checkpoint, the
same step. What depends on what one process can see (a folder listing, a checkpoint that only
node 0's disk holds, a shared filesystem whose listing lags on one node) is either

- decided by rank 0 and handed to the others over the process group (`from_rank0`: the value,
  tensors included, or rank 0's error, which every rank then raises), or
- done on every rank and compared (`on_every_rank`): if any rank fails, every rank raises one
  error naming that rank, its host and what it could not do.

Either way no rank goes on alone into a collective the others never reach (gloo: "Connection
closed by peer"; NCCL: a hang until the watchdog). Errors a rank re-raises for another carry
`from_other_rank = True`, so that a launcher with many ranks prints them once per node, not once
per rank (`fastemd.train.main`).

Tensors travel as flat byte buffers, one dtype at a time in chunks of at most 256 MiB, on the
process group's device (the GPU under NCCL), and come back to the host with their strides.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

CHUNK_BYTES = 256 << 20


def _group_device() -> torch.device:
    """Where the process group's collectives run: the current GPU for NCCL, the host for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class _Slot:
    """A tensor's place in a broadcast skeleton."""

    index: int
    shape: tuple
    stride: tuple
    dtype: torch.dtype


def _strip(value, tensors: list[torch.Tensor]):
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1, tuple(value.shape), tuple(value.stride()), value.dtype)
    if isinstance(value, dict):
        return {k: _strip(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return _rebuilt(value, [_strip(v, tensors) for v in value])
    return value


def _rebuilt(like, items: list):
    """A list or tuple of `like`'s type holding `items` (a named tuple takes them as arguments)."""
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)


def _fill(skeleton, tensors: list[torch.Tensor]):
    if isinstance(skeleton, _Slot):
        return tensors[skeleton.index]
    if isinstance(skeleton, dict):
        return {k: _fill(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return _rebuilt(skeleton, [_fill(v, tensors) for v in skeleton])
    return skeleton


def _slots(skeleton, found: list[_Slot]) -> list[_Slot]:
    if isinstance(skeleton, _Slot):
        found.append(skeleton)
    elif isinstance(skeleton, dict):
        for v in skeleton.values():
            _slots(v, found)
    elif isinstance(skeleton, (list, tuple)):
        for v in skeleton:
            _slots(v, found)
    return found


def broadcast_state(value, src: int = 0):
    """`value` (a nested dict/list of tensors and plain values, on rank `src`; anything, ignored,
    elsewhere) on every rank: plain values by pickle, tensors as flat per-dtype buffers on the
    group's device. The copies are host tensors with the sender's shapes, dtypes and strides."""
    rank = dist.get_rank()
    tensors: list[torch.Tensor] = []
    box = [_strip(value, tensors) if rank == src else None]
    device = _group_device()
    dist.broadcast_object_list(box, src=src, device=device)
    skeleton = box[0]
    slots = sorted(_slots(skeleton, []), key=lambda s: s.index)
    if rank != src:  # the sender's strides where they describe a plain layout (not an expanded view)
        tensors = [torch.empty_strided(s.shape, s.stride, dtype=s.dtype) if _dense(s.shape, s.stride)
                   else torch.empty(s.shape, dtype=s.dtype) for s in slots]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for s in slots:
        by_dtype.setdefault(s.dtype, []).append(s.index)
    for dtype, indices in by_dtype.items():
        per_item = torch.empty((), dtype=dtype).element_size()
        chunk: list[int] = []
        size = 0
        for i in [*indices, None]:
            numel = tensors[i].numel() if i is not None else 0
            if chunk and (i is None or (size + numel) * per_item > CHUNK_BYTES):
                if size:  # every rank knows the sizes: all skip an empty chunk alike
                    _broadcast_chunk([tensors[j] for j in chunk], dtype, size, device, src, rank == src)
                chunk, size = [], 0
            if i is not None:
                chunk.append(i)
                size += numel
    return _fill(skeleton, tensors)


def _dense(shape: tuple, stride: tuple) -> bool:
    """The elements fill their storage span without gaps or overlaps (any order of the dims)."""
    expected = 1
    for step, size in sorted((st, n) for st, n in zip(stride, shape) if n > 1):
        if step != expected:
            return False
        expected *= size
    return True


def _broadcast_chunk(chunk: list[torch.Tensor], dtype: torch.dtype, size: int, device: torch.device,
                     src: int, sending: bool) -> None:
    # As bytes: every backend takes uint8 (gloo has no bool, and some builds no bfloat16).
    nbytes = size * torch.empty((), dtype=dtype).element_size()
    if sending:
        flat = torch.cat([t.reshape(-1) for t in chunk]).view(torch.uint8).to(device)
    else:
        flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dist.broadcast(flat, src=src)
    if sending:
        return
    flat = flat.cpu().view(dtype)
    offset = 0
    for t in chunk:
        t.copy_(flat[offset:offset + t.numel()].view(t.shape))  # copy_ keeps t's strides
        offset += t.numel()


class RankFailure(RuntimeError):
    """Rank 0 (or another rank) failed in a step every rank must pass: unexpected errors of other
    ranks reach this one as this, with their type and first line."""


def _raise_as(kind: type, message: str, from_other_rank: bool) -> None:
    try:
        error = kind(message)
    except Exception:  # noqa: BLE001 - a class that takes other arguments
        error = RankFailure(message)
    error.from_other_rank = from_other_rank
    raise error


def from_rank0(decide: Callable[[], object], *, errors: tuple[type, ...], what: str, share: bool = True):
    """Run `decide()` on rank 0 alone; return its value on every rank (tensors included, see
    `broadcast_state`), or with `share=False` on rank 0 only (the others get None: an object
    only rank 0 uses, nothing crosses ranks). An error of one of the `errors` classes is raised on
    every rank with rank 0's message; any other error (an interrupt too) is raised on rank 0 as it
    is and on the others as a RankFailure saying `what` rank 0 was doing. Without a process
    group: `decide()`."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    outcome, value, failure, own = "ok", None, None, None
    if dist.get_rank() == 0:
        try:
            own = decide()
            value = own if share else None
        except errors as e:
            outcome, failure = "error", e
            value = (type(e), str(e))
        except BaseException as e:  # a bug, Ctrl-C, SystemExit: the others must not wait on a broadcast
            outcome, failure = "crash", e
            value = (RankFailure, f"rank 0 failed while {what}: {type(e).__name__}: {_first_line(e)}")
    shared = broadcast_state({"outcome": outcome, "value": value})
    if failure is not None:
        raise failure
    if shared["outcome"] != "ok":
        _raise_as(*shared["value"], from_other_rank=True)
    return shared["value"] if share else own


def on_every_rank(work: Callable[[], object], *, errors: tuple[type, ...], what: str, share: bool = True):
    """Run `work()` on every rank; return every rank's value (a list by rank: small, picklable
    values), or with `share=False` this rank's own (a loader, a model: nothing crosses ranks). If
    any rank fails with one of `errors`, every rank raises: the lowest failing rank its own
    error, the others that class with one line naming that rank, its host and its message (marked
    `from_other_rank`, their own error too: a failure every rank meets alike is said once per
    node, not once per rank). Any other error (an interrupt too) is raised on its rank as it is
    and stops the others with a RankFailure. Without a process group: [work()] (or work())."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [work()] if share else work()
    failure, report, own = None, ("ok", None), None
    try:
        own = work()
        report = ("ok", own if share else None)
    except errors as e:
        failure, report = e, ("error", (type(e), str(e)))
    except BaseException as e:
        failure, report = e, ("crash", (RankFailure, f"{type(e).__name__}: {_first_line(e)}"))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (socket.gethostname(), report))
    failed = [r for r, (_, (outcome, _)) in enumerate(gathered) if outcome != "ok"]
    if not failed:
        return [value for _, (_, value) in gathered] if share else own
    first = failed[0]
    if failure is not None and (dist.get_rank() == first or report[0] == "crash"):
        raise failure
    host, (_, (kind, message)) = gathered[first]
    _raise_as(kind, f"rank {first} on {host} {what}: {message}", from_other_rank=True)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]
