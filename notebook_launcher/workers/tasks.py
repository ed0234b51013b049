"""What a rank can be asked to do, each a small picklable object with ``run(namespace)``.

Tasks travel to the ranks pickled with dill (`serialization.dumps_task_parts`), so a
function defined in the notebook after the ranks started still works: it goes by value;
their tensors and arrays travel as buffers beside the pickle (`shared_memory`). The
``namespace`` is the rank's own persistent dict of names (what ``%%dist`` cells define);
`Call` does not use it, the others live in it.

Example::

    Execute("x = rank * 2", "<dist-cell-1>").run(namespace)   # namespace["x"] == 2 on rank 1
    Execute("x + 1", "<dist-cell-2>").run(namespace)          # "3" on rank 1
    Push({"lr": 0.1}, key=1).run(namespace); Bind(1).run(namespace)   # namespace["lr"] == 0.1
"""

from __future__ import annotations

import ast
import linecache
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Call:
    """``function(*args, **kwargs)``; its return value is the task's value."""

    by_value = True     # pickled with dill: the notebook's functions travel by value

    function: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def run(self, namespace: dict) -> Any:
        return self.function(*self.args, **self.kwargs)


@dataclass
class Execute:
    """Run a cell's source in the rank's namespace, like IPython does: statements, then a
    last expression whose value, when not None, is shown: the task's value is its repr
    (the object itself may not pickle; `Pull` fetches objects)."""

    source: str
    filename: str               # "<dist-cell-N>": shown in tracebacks, with the lines
    by_value = False            # plain data: the C pickler is enough

    def run(self, namespace: dict) -> Any:
        lines = self.source.splitlines(keepends=True)
        linecache.cache[self.filename] = (len(self.source), None, lines, self.filename)
        tree = ast.parse(self.source, self.filename, "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, self.filename, "exec"), namespace)
        if last is None:
            return None
        value = eval(compile(ast.Expression(last.value), self.filename, "eval"), namespace)
        return None if value is None else repr(value)


@dataclass
class Pull:
    """A variable from the rank's namespace (tensors come back on the CPU)."""

    name: str
    by_value = False

    def run(self, namespace: dict) -> Any:
        if self.name not in namespace:
            raise NameError(f"name {self.name!r} is not defined on this rank")
        return namespace[self.name]


# Values of a push loaded on this rank, waiting for the push's second step (`Bind`).
_held: dict = {}


@dataclass
class Push:
    """The first step of a push: the values are loaded here (their buffers mapped from the
    notebook's memory file, or copied from the message, as the task is unpickled) and held
    aside, unbound, until `Bind` says that every rank holds them. A newer push drops an
    older one that never got its second step (it was interrupted)."""

    values: dict
    key: int = 0
    by_value = True     # the values may hold notebook functions and classes

    def run(self, namespace: dict) -> Any:
        _held.clear()
        _held[self.key] = self.values
        return None


@dataclass
class Bind:
    """The second step of a push: bind the held values in the rank's namespace (or, with
    ``bind=False``, drop them: the first step was cut on some rank)."""

    key: int
    bind: bool = True
    by_value = False

    def run(self, namespace: dict) -> Any:
        values = _held.pop(self.key, None)
        _held.clear()
        if self.bind:
            if values is None:
                raise RuntimeError("the pushed values are not held on this rank (their first step did not run here)")
            namespace.update(values)
        return None
