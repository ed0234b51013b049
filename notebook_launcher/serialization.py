"""How objects cross the process boundary.

- Tasks (the user's function and arguments) go to spawned workers with dill, by value
  when they live in the notebook (``__main__``), including the notebook globals they use
  (dill's ``recurse`` setting). Forked workers need no pickling at all.
- Results come back with plain pickle (dill as a fallback, e.g. for a returned lambda),
  and every tensor on an accelerator is copied to the CPU on the way out: unpickling a
  CUDA tensor in the kernel would initialize CUDA there.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from typing import Any

import torch


class _CPUPickler(pickle.Pickler):
    """Pickler that moves accelerator tensors to the CPU as it writes them."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.device.type not in ("cpu", "meta"):
            cpu = obj.detach().cpu()
            if isinstance(obj, torch.nn.Parameter):
                cpu = torch.nn.Parameter(cpu, requires_grad=obj.requires_grad)
            return cpu.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        return NotImplemented


def dumps_cpu(value: Any) -> bytes:
    """Plain pickle, with accelerator tensors moved to the CPU (e.g. for exceptions)."""
    buffer = io.BytesIO()
    _CPUPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def dumps_result(value: Any) -> tuple[bytes, str]:
    """Serialize a worker's return value; returns ``(blob, pickler_name)``."""
    try:
        return dumps_cpu(value), "pickle"
    except Exception as first_error:
        try:
            return _dill_dumps_cpu(value), "dill"
        except Exception:
            raise first_error from None


def _dill_dumps_cpu(value: Any) -> bytes:
    import dill

    class CPUDillPickler(dill.Pickler):  # dill's pickler is pure Python: reducer_override applies
        reducer_override = _CPUPickler.reducer_override

    buffer = io.BytesIO()
    with dill_recurse():
        CPUDillPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def loads_result(blob: bytes, pickler: str) -> Any:
    if pickler == "dill":
        import dill

        return dill.loads(blob)
    return pickle.loads(blob)




@contextlib.contextmanager
def dill_recurse():
    """Pickle functions with only the globals they use (and so, notebook functions by value)."""
    import dill

    previous = dill.settings.get("recurse", False)
    dill.settings["recurse"] = True
    try:
        yield
    finally:
        dill.settings["recurse"] = previous


def dumps_task(obj: Any) -> bytes:
    import dill

    with dill_recurse():
        return dill.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads_task(blob: bytes) -> Any:
    import dill

    return dill.loads(blob)


def unsendable_reason(obj: Any) -> str | None:
    """Why ``obj`` cannot be sent to a spawned worker, or None when it can."""
    try:
        dumps_task(obj)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
