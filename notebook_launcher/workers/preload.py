"""What the parent imports before it forks, so that forked workers inherit it.

The one module worth it is ``torch._dynamo``: torch imports it lazily from
`DistributedDataParallel`'s constructor, from every `torch.optim` optimizer's
constructor, from FSDP and from `torch.compile`. Imported in a forked worker it costs
about 2.5 s per worker on a 2-core machine (every worker imports it at once), paid again
at every launch; imported once in the parent before the fork it costs about 0.75 s, once
per kernel (less with the garbage collector paused: `preload`). For a function that never
reaches it, the same 0.75 s is pure loss on the first call: a trivial function's first
call went from 0.06 s to 1.26 s that way.

How we decide (`reason_to_preload`): we read what the launched function can reach,
without running or importing anything:

- the names its code uses (``co_names``: globals, attributes, imported modules and
  names, so ``torch.optim.SGD``, ``nn.parallel.DistributedDataParallel`` and
  ``from torch.nn.parallel import DistributedDataParallel as DDP`` all show);
- what its global and closure names are bound to (a notebook-level ``DDP`` alias is the
  DDP class; ``opt = torch.optim.AdamW`` is an optimizer class), and the attributes of
  user modules it names, looked up in the module's ``__dict__`` only, never through a
  ``__getattr__`` (torch's would import the very module we are deciding about);
- recursively, every function, user class (its methods and bases), bound method,
  callable object and ``functools.partial`` reached that way, and callables passed as
  arguments; not torch's own code, ours, or the standard library (torch's internals
  mention dynamo everywhere: what matters is which torch entry points the user calls).
  At most `MAX_CODE_OBJECTS` code objects are read: about 0.1 ms for a trivial
  function or a DDP training loop (measured on the benchmark's workloads).

We preload when a name or object is a known way in (`TRIGGER_NAMES`, `TRIGGER_MODULES`:
DDP, FSDP, optimizers and schedulers, ``torch.compile``, accelerate's / our
``Accelerator``, Lightning's ``Fabric`` and ``Trainer``, HF ``Trainer``). ``compile`` alone
is too common (``re.compile``): it counts when the bytecode loads it from ``torch``
(`_loads_torch_compile`). A miss (code we cannot see: ``exec``, ``getattr`` by string)
costs what it cost before preloading existed: each worker imports the module itself; a
false hit costs the 0.75 s once per kernel. Nothing is preloaded for spawn (a spawned
worker inherits nothing) or when the module is already imported.

Why this is safe with fork: a fork copies only the calling thread, so a thread that
holds a lock at fork time leaves that lock held forever in the child. Importing
``torch._dynamo`` starts no thread (checked on torch 2.13: the process has the same
threads before and after; `tests/test_first_call_kernel.py` checks it), and it runs in the
thread that forks, to completion, before the fork. The rendezvous store's server thread
starts only after every worker is forked (`launcher.start_ranks`), so nothing of ours
runs concurrently with the import or the fork either. Pausing the garbage collector
(`preload`) is process-wide but only defers collection by about a second, for the
kernel's other threads too; its previous state is restored. An exception from the
import is swallowed: the preload is a speed-up, never a reason for a launch to fail.
"""

from __future__ import annotations

import dis
import functools
import gc
import importlib
import inspect
import os
import sys
import types
from typing import Any, Callable, Optional

PRELOAD_MODULE = "torch._dynamo"
MAX_CODE_OBJECTS = 400   # a bound on the walk; real training code needs a few dozen

# A name used by the code, or an object's (or a base class's) name, that leads to
# torch._dynamo: DDP and FSDP constructors, every torch.optim optimizer, the trainers
# and accelerators that build those.
TRIGGER_NAMES = frozenset({
    "DistributedDataParallel", "FullyShardedDataParallel", "fully_shard", "optim", "Optimizer",
    "lr_scheduler", "Accelerator", "Fabric", "Trainer", "_dynamo",
})
# Objects defined in these modules (or below them) lead there as well.
TRIGGER_MODULES = ("torch.optim", "torch.nn.parallel.distributed", "torch.distributed.fsdp",
                   "torch._dynamo", "torch._inductor", "torch.distributed._composable")
_SKIPPED_PACKAGES = ("torch", "notebook_launcher")  # judged by the tables above, not walked


def before_fork(task: Any) -> None:
    """Import `PRELOAD_MODULE` here when ``task``'s function can reach it (see the module
    docstring). ``task`` is the workers' first task: a `tasks.Call`; None (spawn, or a
    session whose tasks come later) or another kind of task: nothing is done.

    Example::

        before_fork(Call(train, (model,)))   # imports torch._dynamo if train builds DDP
    """
    function = getattr(task, "function", None)
    if function is None or PRELOAD_MODULE in sys.modules:
        return
    try:  # an optional speed-up, never a reason to fail a launch (user objects can raise anything)
        if reason_to_preload(function, getattr(task, "args", ()), getattr(task, "kwargs", None)) is None:
            return
    except Exception:
        return
    preload()


def preload() -> None:
    """Import `PRELOAD_MODULE` now, with the cyclic garbage collector paused.

    The import creates about 800 modules' worth of long-lived objects, which trigger
    about 300 automatic collections, two of them full ones that walk every object in
    the process: 0.33 s of a 1.26 s import. Paused, the import took 1.05 s (medians of
    8 runs each from a plain process, torch 2.13, a 2-core machine at load 1), the
    young collection right after it included. The collector is turned back on at once
    (if it was on). An exception from the import is swallowed: a speed-up, never a
    reason to fail.

    Example::

        preload()   # torch._dynamo is in sys.modules now, or it could not be imported
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        importlib.import_module(PRELOAD_MODULE)
    except Exception:
        pass
    finally:
        if was_enabled:
            gc.enable()


def reason_to_preload(function: Callable, args: tuple = (), kwargs: Optional[dict] = None) -> Optional[str]:
    """The first way into torch._dynamo found in what ``function`` can reach, as
    ``"where: what"``, or None when there is none to see.

    Example::

        def train():
            model = torch.nn.parallel.DistributedDataParallel(net)
        reason_to_preload(train)   # "train: DistributedDataParallel"
        reason_to_preload(print)   # None
    """
    walk = _Walk()
    for value in (function, *args, *(kwargs or {}).values()):
        if callable(value):
            found = walk.add(value)
            if found:
                return found
    return walk.run()


class _Walk:
    """Breadth-first over code objects, each with the namespace its names resolve in."""

    def __init__(self) -> None:
        self.pending: list = []    # (code, globals, closure values by name, where)
        self.seen: set = set()
        self.read = 0

    def add(self, obj: Any, caller: str = "") -> Optional[str]:
        """Queue the code ``obj`` runs; a reason right away when ``obj`` is a way in.
        ``caller``: the path that reached it, for the reason's text."""
        obj = _unwrap(obj)
        if id(obj) in self.seen:
            return None
        self.seen.add(id(obj))
        where = f"{caller} -> {_name(obj)}" if caller else _name(obj)
        if isinstance(obj, functools.partial):
            parts = (obj.func, *obj.args, *obj.keywords.values())
            return next((r for r in (self.add(p, caller) for p in parts if callable(p)) if r), None)
        if isinstance(obj, types.MethodType):
            return self.add(obj.__func__, caller) or self.add(type(obj.__self__), caller)
        found = _trigger_of(obj)
        if found:
            return f"{where}: {found}"
        if _skipped(obj):
            return None
        if isinstance(obj, types.FunctionType):
            closure = dict(zip(obj.__code__.co_freevars, (_cell(c) for c in obj.__closure__ or ())))
            self.pending.append((obj.__code__, obj.__globals__, closure, where))
            return None
        if isinstance(obj, type):
            return self._add_methods(obj, caller) if not _library(obj) else None
        if isinstance(getattr(type(obj), "__call__", None), types.FunctionType):
            return self.add(type(obj), caller)  # a callable object: what its class runs
        return None

    def _add_methods(self, cls: type, caller: str) -> Optional[str]:
        for base in cls.__mro__:
            if base is object or _skipped(base) or _library(base):
                continue
            for member in list(vars(base).values()):
                member = member.fget if isinstance(member, property) else member
                member = getattr(member, "__func__", member)  # staticmethod, classmethod
                if isinstance(member, types.FunctionType):
                    found = self.add(member, caller)
                    if found:
                        return found
        return None

    def run(self) -> Optional[str]:
        while self.pending and self.read < MAX_CODE_OBJECTS:
            code, namespace, closure, where = self.pending.pop(0)
            self.read += 1
            found = self._read(code, namespace, closure, where)
            if found:
                return found
            self.pending += [(c, namespace, {}, where) for c in code.co_consts if isinstance(c, types.CodeType)]
        return None

    def _read(self, code: types.CodeType, namespace: dict, closure: dict, where: str) -> Optional[str]:
        names = code.co_names
        parts = {part for name in names for part in name.split(".")}
        hit = parts & TRIGGER_NAMES
        if hit:
            return f"{where}: {min(hit)}"
        if "compile" in parts and _loads_torch_compile(code):
            return f"{where}: torch.compile"
        bound = [closure[name] for name in code.co_freevars if name in closure]
        bound += [namespace[name] for name in names if name in namespace]
        bound += [sys.modules[name] for name in names if name in sys.modules]  # imported inside
        for module in [obj for obj in bound if isinstance(obj, types.ModuleType) and not _skipped(obj)]:
            bound += [vars(module)[name] for name in names if name in vars(module)]
        for obj in bound:
            if callable(obj) or isinstance(obj, types.ModuleType):
                found = self.add(obj, where)
                if found:
                    return found
        return None


def _loads_torch_compile(code: types.CodeType) -> bool:
    """Whether the bytecode loads ``compile`` as an attribute of a name ``torch``."""
    previous = None
    for instruction in dis.get_instructions(code):
        if instruction.argval == "compile" and instruction.opname in ("LOAD_ATTR", "LOAD_METHOD", "IMPORT_FROM"):
            if previous is not None and previous.argval == "torch":
                return True
        previous = instruction
    return False


def _trigger_of(obj: Any) -> Optional[str]:
    """The qualified name of ``obj`` (or of its base class) when it leads to torch._dynamo."""
    torch = sys.modules.get("torch")
    if torch is not None and obj is vars(torch).get("compile"):
        return "torch.compile"
    if isinstance(obj, types.ModuleType):
        module = name = obj.__name__
    elif isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        module = getattr(obj, "__module__", None) or ""
        name = f"{module}.{obj.__qualname__}"
        bases = obj.__mro__ if isinstance(obj, type) else (obj,)
        hit = [base for base in bases if getattr(base, "__name__", "") in TRIGGER_NAMES]
        if hit:
            return name if hit[0] is obj else f"{name} (subclass of {hit[0].__name__})"
    else:
        return None
    if any(module == m or module.startswith(m + ".") for m in TRIGGER_MODULES):
        return name
    return None


def _skipped(obj: Any) -> bool:
    """torch's code and ours are judged by name, never walked; the standard library is not walked."""
    module = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None) or ""
    top = module.split(".")[0]
    return top in _SKIPPED_PACKAGES or top in sys.stdlib_module_names


def _library(cls: type) -> bool:
    """A class from an installed package: its (many) methods are not walked, its name and bases are judged."""
    module = sys.modules.get(cls.__module__ or "")
    filename = getattr(module, "__file__", None) or ""
    return f"{os.sep}site-packages{os.sep}" in filename or f"{os.sep}dist-packages{os.sep}" in filename


def _unwrap(obj: Any) -> Any:
    try:
        return inspect.unwrap(obj) if isinstance(obj, types.FunctionType) else obj
    except ValueError:  # a cycle of __wrapped__
        return obj


def _cell(cell) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell: a name assigned later
        return None


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
