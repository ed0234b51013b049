"""How objects cross the process boundary.

- Tasks (the user's function and arguments) go to the ranks with dill, by value when they
  live in the notebook (``__main__``), including the notebook globals they use (dill's
  ``recurse`` setting). A one-shot launch's forked ranks need no pickling at all.
- Results come back with plain pickle (dill as a fallback, e.g. for a returned lambda),
  and every tensor on an accelerator is copied to the CPU on the way out: unpickling a
  CUDA tensor in the kernel would initialize CUDA there.
- Tensor storages and numpy arrays are pickled as protocol-5 buffers: the pickle itself
  is a small header, the data is a list of buffers (never ``torch.save``'s copy). Storages
  are written once however many tensors view them, so views still share their storage on
  the other side, strides and offsets included.

The buffers travel one of two ways (`Parcel` for results, `channel.TaskRequest` for tasks):
- inline, inside the message: small values (under `shared_memory.MIN_SHARED_BYTES`), and
  every value to or from a rank on another machine;
- through a memory file (`shared_memory`), for big values between the notebook and ranks
  of this machine: written once by the sender, mapped by the receiver, whose tensors then
  live over that mapping (one copy in all; freed with the last tensor over it).

Example::

    payload, pickler = dumps_result(state_dict, inbox=address)   # in a rank
    loads_result(payload, pickler)                                # in the notebook
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from typing import Any, Optional

import torch

from . import shared_memory

_PROTOCOL = 5


# ----------------------------------------------------------------- pickling tensors as buffers
class _StorageBox:
    """One storage being pickled: pickle memoizes the box, so a storage shared by several
    tensors (views, tied weights) is written once and rebuilt once."""

    __slots__ = ("storage", "__weakref__")

    def __init__(self, storage) -> None:
        self.storage = storage

    def buffer(self) -> pickle.PickleBuffer:
        nbytes = self.storage.nbytes()
        if nbytes == 0:
            return pickle.PickleBuffer(bytearray())
        flat = torch.empty(0, dtype=torch.uint8).set_(self.storage, 0, (nbytes,), (1,))
        return pickle.PickleBuffer(_writable_view(flat))


def _writable_view(flat: torch.Tensor) -> Any:
    """A writable buffer over a CPU uint8 tensor's bytes that keeps the tensor alive."""
    try:
        return flat.numpy()
    except (RuntimeError, ImportError):  # torch without numpy
        import ctypes

        array = (ctypes.c_ubyte * flat.numel()).from_address(flat.data_ptr())
        array._keep = flat
        return array


def _reduce(pickler, obj):
    """``reducer_override`` of every pickler here: accelerator tensors to the CPU, CPU
    storages as buffers; everything else as usual."""
    if isinstance(obj, torch.Tensor) and obj.device.type not in ("cpu", "meta"):
        cpu = obj.detach().cpu()
        if isinstance(obj, torch.nn.Parameter):
            cpu = torch.nn.Parameter(cpu, requires_grad=obj.requires_grad)
        return cpu.__reduce_ex__(_PROTOCOL)   # its storage, kept alive by its box below
    if type(obj) is torch.storage.TypedStorage and obj._untyped_storage.device.type == "cpu":
        return _typed_storage, (_box(pickler, obj._untyped_storage), obj.dtype)
    if type(obj) is torch.UntypedStorage and obj.device.type == "cpu":
        return _same, (_box(pickler, obj),)
    if type(obj) is _StorageBox:
        return _untyped_storage, (obj.buffer(),)
    return NotImplemented


def _box(pickler, storage) -> _StorageBox:
    key = storage._cdata   # the storage itself: every view of it has its own Python wrapper
    box = pickler._boxes.get(key)
    if box is None:
        box = pickler._boxes[key] = _StorageBox(storage)
    return box


def _untyped_storage(buffer) -> torch.UntypedStorage:
    """A storage over ``buffer`` (a mapped view, or a bytearray from an inline message), no copy."""
    view = memoryview(buffer).cast("B")
    if view.nbytes == 0:
        return torch.UntypedStorage(0)
    if view.readonly:
        view = memoryview(bytearray(view))
    return torch.frombuffer(view, dtype=torch.uint8).untyped_storage()


def _typed_storage(untyped, dtype) -> torch.storage.TypedStorage:
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _same(obj):
    return obj


class _CPUPickler(pickle.Pickler):
    """Plain pickle, protocol 5: accelerator tensors to the CPU, storages as buffers
    (given to ``buffer_callback`` when there is one, else written inline). A box holds
    each storage until the pickler is gone, so a buffer's memory (and a storage's key)
    stays valid while pickling."""

    def __init__(self, file, buffer_callback=None) -> None:
        super().__init__(file, protocol=_PROTOCOL, buffer_callback=buffer_callback)
        self._boxes: dict = {}

    def reducer_override(self, obj):
        return _reduce(self, obj)


_dill_pickler = None


def _dill_class():
    """dill's pickler with the same ``reducer_override`` (dill's pickler is pure Python: it applies)."""
    global _dill_pickler
    if _dill_pickler is None:
        import dill

        class DillPickler(dill.Pickler):
            def __init__(self, file, buffer_callback=None) -> None:
                super().__init__(file, protocol=_PROTOCOL, buffer_callback=buffer_callback)
                self._boxes: dict = {}

            def reducer_override(self, obj):
                return _reduce(self, obj)

        _dill_pickler = DillPickler
    return _dill_pickler


def _dump(pickler_class, value: Any, buffers: Optional[list]) -> bytes:
    """The pickled header; the buffers appended to ``buffers`` (each `pickle.PickleBuffer`
    keeps its memory alive), or inline when ``buffers`` is None."""
    out = io.BytesIO()
    pickler_class(out, None if buffers is None else buffers.append).dump(value)
    return out.getvalue()


def dumps_cpu(value: Any) -> bytes:
    """Plain pickle, accelerator tensors moved to the CPU, data inline (e.g. for exceptions)."""
    return _dump(_CPUPickler, value, None)


# ----------------------------------------------------------------- results
class Parcel:
    """A result with buffers: the pickled header, and its buffers either inline (a list)
    or in a memory file handed to the notebook's inbox (``nonce`` names it there).

    In the notebook the file is claimed when the call ends (`shared_memory.settle` calls
    `hold`) and mapped when the value is loaded; a parcel dropped unloaded closes it."""

    def __init__(self, header: bytes, buffers: Optional[list] = None, layout=None,
                 nonce: Optional[bytes] = None) -> None:
        self.header = header
        self.buffers = buffers
        self.layout = layout
        self.nonce = nonce
        self._fd: Optional[int] = None

    def __getstate__(self) -> dict:
        return {"header": self.header, "buffers": self.buffers, "layout": self.layout, "nonce": self.nonce}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _fd=None)

    def hold(self, fd: int) -> None:
        self._release()
        self._fd = fd

    def open(self) -> list:
        """The buffers: inline ones as they came, a file's mapped here (once)."""
        if self.buffers is not None:
            return self.buffers
        fd, self._fd = self._fd, None
        if fd is None:
            box = shared_memory.inbox()
            if box is None:
                raise RuntimeError("a rank sent its value through shared memory, but this process has no inbox")
            fd = box.claim(self.nonce)
        try:
            return shared_memory.map_buffers(fd, self.layout)
        finally:
            os.close(fd)

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:
            pass


_PLAIN = frozenset({type(None), bool, int, float, str})


def dumps_result(value: Any, inbox: Optional[bytes] = None) -> tuple:
    """Serialize a rank's value: ``(payload, pickler_name)``, the payload the pickled bytes
    (no buffers) or a `Parcel`. ``inbox``: the notebook's inbox when it runs on this
    machine; big buffers then go through a memory file handed to it."""
    if type(value) in _PLAIN:   # a cell's shown value (a repr), None: no buffers, no pickler of ours
        return pickle.dumps(value, _PROTOCOL), "pickle"
    buffers: list = []
    try:
        header, pickler = _dump(_CPUPickler, value, buffers), "pickle"
    except Exception as first_error:
        buffers = []
        try:
            with dill_recurse():
                header, pickler = _dump(_dill_class(), value, buffers), "dill"
        except Exception:
            raise first_error from None
    if not buffers:
        return header, pickler
    return _parcel(header, buffers, inbox), pickler


def _parcel(header: bytes, buffers: list, inbox: Optional[bytes]) -> Parcel:
    raws = [b.raw() for b in buffers]
    if inbox is not None and sum(r.nbytes for r in raws) >= shared_memory.MIN_SHARED_BYTES:
        fd, layout = shared_memory.write_memfd(raws)
        try:
            nonce = shared_memory.new_nonce()
            shared_memory.send_to_inbox(inbox, fd, nonce)
            return Parcel(header, layout=layout, nonce=nonce)
        except OSError:
            pass  # the notebook's inbox is not reachable: inline, as from another machine
        finally:
            os.close(fd)
    return Parcel(header, buffers=buffers)


def loads_result(payload: Any, pickler: str) -> Any:
    """The value of `dumps_result`'s ``(payload, pickler)``."""
    buffers = None
    if isinstance(payload, Parcel):
        payload, buffers = payload.header, payload.open()
    if pickler == "dill":
        import dill

        return dill.loads(payload, buffers=buffers)
    return pickle.loads(payload, buffers=buffers)


# ----------------------------------------------------------------- tasks
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
    """A task for the ranks, with its data inline (e.g. a one-shot's first task)."""
    with dill_recurse():
        return _dump(_dill_class(), obj, None)


def dumps_task_parts(obj: Any, by_value: bool = True) -> tuple:
    """A task as ``(header, buffers)``: the buffers (`pickle.PickleBuffer`) to send inline
    or write into a memory file (`shared_memory.Outgoing`), in order. ``by_value``: with
    dill (functions of the notebook by value); False for tasks of plain data (a cell's
    source, a name), which the C pickler writes 15 times faster."""
    buffers: list = []
    if not by_value:
        return _dump(_CPUPickler, obj, buffers), buffers
    with dill_recurse():
        header = _dump(_dill_class(), obj, buffers)
    return header, buffers


def loads_task(blob: bytes, buffers: Optional[list] = None, by_value: bool = True) -> Any:
    if not by_value:
        return pickle.loads(blob, buffers=buffers)
    import dill

    return dill.loads(blob, buffers=buffers)


def load_request(request) -> Any:
    """In a rank: the task of a `channel.TaskRequest`, its buffers inline or mapped from
    the notebook's memory file."""
    buffers = request.buffers
    if request.shared is not None:
        buffers = request.shared.map()
    return loads_task(request.blob, buffers, request.by_value)


def unsendable_reason(obj: Any) -> str | None:
    """Why ``obj`` cannot be sent to a spawned worker, or None when it can (its data is
    not copied to find out)."""
    try:
        with dill_recurse():
            _dill_class()(io.BytesIO(), lambda buffer: False).dump(obj)   # buffers out of band, and dropped
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
