"""What a rank can be asked to do, each a small picklable object with ``run(namespace)``.

Tasks travel to the ranks pickled with dill (`serialization.dumps_task`), so a function
defined in the notebook after the ranks started still works: it goes by value. The
``namespace`` is the rank's own persistent dict of names (what ``%%dist`` cells define);
`Call` does not use it, the others live in it.

Example::

    Execute("x = rank * 2", "<dist-cell-1>").run(namespace)   # namespace["x"] == 2 on rank 1
    Execute("x + 1", "<dist-cell-2>").run(namespace)          # "3" on rank 1
"""

from __future__ import annotations

import ast
import linecache
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Call:
    """``function(*args, **kwargs)``; its return value is the task's value."""

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

    def run(self, namespace: dict) -> Any:
        if self.name not in namespace:
            raise NameError(f"name {self.name!r} is not defined on this rank")
        return namespace[self.name]


@dataclass
class Push:
    """Bind names in the rank's namespace."""

    values: dict

    def run(self, namespace: dict) -> Any:
        namespace.update(self.values)
        return None
