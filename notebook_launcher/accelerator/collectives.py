"""Collectives over (nested) tensors: gather, reduce, pad, broadcast, and object gathering.

All of them are identity-like when there is one process, so a training function
written for N ranks also runs as a plain script. Tensors of different lengths along the
first dimension can be gathered: lengths are exchanged first and the padding is removed
again, so no caller has to pad by hand.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.distributed as dist

from .state import ProcessState

REDUCTIONS = ("sum", "mean", "max", "min", "none")


def map_tensors(fn: Callable, data: Any, *, strict: bool = False) -> Any:
    """``fn`` applied to every tensor of a nested list/tuple/dict; other leaves kept (or,
    with ``strict``, a TypeError)."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(map_tensors(fn, v, strict=strict) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(map_tensors(fn, v, strict=strict) for v in data)
    if isinstance(data, dict):
        return type(data)({k: map_tensors(fn, v, strict=strict) for k, v in data.items()})
    if strict:
        raise TypeError(f"expected tensors (or lists/tuples/dicts of tensors), found {type(data).__name__}")
    return data


def only_tensors(data: Any) -> bool:
    try:
        map_tensors(lambda t: t, data, strict=True)
        return True
    except TypeError:
        return False


def _sizes(length: int, state: ProcessState, device: torch.device) -> list:
    mine = torch.tensor([length], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(state.num_processes)]
    dist.all_gather(sizes, mine)
    return [int(s.item()) for s in sizes]


def _gather_tensor(tensor: torch.Tensor, state: ProcessState) -> torch.Tensor:
    if tensor.ndim == 0:
        tensor = tensor[None]
    as_bool = tensor.dtype == torch.bool
    if as_bool:  # not every backend reduces or gathers bool tensors
        tensor = tensor.to(torch.uint8)
    tensor = tensor.contiguous()
    sizes = _sizes(tensor.shape[0], state, tensor.device)
    longest = max(sizes)
    if tensor.shape[0] < longest:
        tensor = _pad(tensor, 0, longest, 0, False)
    parts = [torch.empty_like(tensor) for _ in range(state.num_processes)]
    dist.all_gather(parts, tensor)
    out = torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)
    return out.bool() if as_bool else out


def gather(data: Any, state: ProcessState) -> Any:
    """Every rank's tensors, concatenated along the first dimension, in rank order.

    0-d tensors become 1-element ones. Returned on every rank.

    Example::

        gather(torch.tensor([rank]), state)   # tensor([0, 1]) on both of 2 ranks
    """
    if not state.use_distributed:
        return map_tensors(lambda t: t[None] if t.ndim == 0 else t, data)
    return map_tensors(lambda t: _gather_tensor(t, state), data, strict=True)


def gather_object(obj: Any, state: ProcessState) -> list:
    """Picklable objects from every rank: lists are concatenated, anything else listed."""
    if not state.use_distributed:
        return list(obj) if isinstance(obj, (list, tuple)) else [obj]
    parts = [None] * state.num_processes
    dist.all_gather_object(parts, obj)
    if isinstance(obj, (list, tuple)):
        return [item for part in parts for item in part]
    return parts


def reduce(data: Any, state: ProcessState, reduction: str = "sum", scale: float = 1.0) -> Any:
    """Tensors combined across ranks ("sum", "mean", "max", "min" or "none"), times ``scale``.

    Every rank gets the result; the input is not modified.

    Example::

        reduce(torch.tensor([1.0 + rank]), state, "mean")   # tensor([1.5]) with 2 ranks
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")

    def one(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        if reduction != "none" and state.use_distributed:
            op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
                  "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[reduction]
            dist.all_reduce(out, op=op)
        if reduction == "mean":
            out = out / state.num_processes
        return out * scale if scale != 1.0 else out

    return map_tensors(one, data, strict=True)


def _pad(tensor: torch.Tensor, dim: int, length: int, value: Any, first: bool) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[dim] = length - tensor.shape[dim]
    filler = torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([filler, tensor] if first else [tensor, filler], dim=dim)


def pad_across_processes(data: Any, state: ProcessState, dim: int = 0, pad_index: Any = 0,
                         pad_first: bool = False) -> Any:
    """Tensors padded along ``dim`` to the longest across ranks, so they can be gathered.

    Example::

        pad_across_processes(torch.arange(rank + 1), state)   # length 2 on both of 2 ranks
    """
    def one(tensor: torch.Tensor) -> torch.Tensor:
        if not state.use_distributed or tensor.ndim == 0 or dim >= tensor.ndim or dim < -tensor.ndim:
            return tensor
        longest = max(_sizes(tensor.shape[dim], state, tensor.device))
        if tensor.shape[dim] == longest:
            return tensor
        return _pad(tensor, dim, longest, pad_index, pad_first)

    return map_tensors(one, data, strict=True)


def broadcast_int(value: int, state: ProcessState, src: int = 0) -> int:
    """Rank ``src``'s integer, on every rank."""
    if not state.use_distributed:
        return int(value)
    tensor = torch.tensor([value], dtype=torch.int64, device=state.device)
    dist.broadcast(tensor, src=src)
    return int(tensor.item())


def barrier(state: ProcessState) -> None:
    """Wait until every rank gets here."""
    if not state.use_distributed:
        return
    if state.device.type == "cuda":
        dist.barrier(device_ids=[state.device.index])
    else:
        dist.barrier()


def truncate(data: Any, length: int, as_objects: bool) -> Any:
    """The first ``length`` items along the first dimension (or of a gathered object list)."""
    if as_objects:
        return data[:length]
    return map_tensors(lambda t: t[:length], data)


@contextlib.contextmanager
def split_between_processes(inputs: Any, state: ProcessState, apply_padding: bool = False):
    """This rank's contiguous share of a list, tuple, tensor or dict of those.

    Earlier ranks get one item more when the length does not divide; with
    ``apply_padding`` every rank gets the same length (the last item repeated), so
    results can be gathered.

    Example::

        with split_between_processes(["a", "b", "c"], state) as mine:
            ...   # rank 0: ["a", "b"], rank 1: ["c"]
    """
    yield _share(inputs, state, apply_padding)


def _share(inputs: Any, state: ProcessState, apply_padding: bool) -> Any:
    if isinstance(inputs, dict):
        lengths = {len(v) for v in inputs.values()}
        if len(lengths) > 1:
            raise ValueError("split_between_processes needs every value of the dict to have the same length.")
        return {k: _share(v, state, apply_padding) for k, v in inputs.items()}
    if state.num_processes == 1:
        return inputs
    length, world, rank = len(inputs), state.num_processes, state.process_index
    each, extra = divmod(length, world)
    start = rank * each + min(rank, extra)
    part = inputs[start: start + each + (1 if rank < extra else 0)]
    if apply_padding and extra:
        missing = each + 1 - len(part)
        if missing and length:
            last = inputs[-1:]
            if isinstance(part, torch.Tensor):
                part = torch.cat([part] + [last] * missing)
            else:
                part = part + last * missing
    return part
