"""A script, a module or a function in a file, as the task every worker runs.

`python -m notebook_launcher run` hands a `ScriptTask` to `notebook_launcher(...)`: each
worker then runs the script as ``__main__`` (``sys.argv`` as the script expects it),
``python -m``'s way for a module, or imports the file and calls the function. The task
is plain data (strings), so dill sends it by value to spawned workers too.

`script_task` checks the target in the parent, without running any of it, so that a typo
or a syntax error is reported before a single process starts.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import os
import runpy
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .errors import LaunchConfigError

KINDS = ("script", "module", "function")


@dataclass(frozen=True)
class ScriptTask:
    """What one worker runs; calling it runs it (in the worker).

    kind: "script" (``target`` is a file run as ``__main__``), "module" (``target`` is a
    module name run like ``python -m``) or "function" (``function`` in the file ``target``
    is called with no arguments and its value returned).
    """

    kind: str
    target: str
    function: str = ""
    argv: tuple = ()

    def __call__(self) -> Any:
        saved_argv, saved_path = sys.argv[:], sys.path[:]
        sys.argv = [self.target, *self.argv]
        sys.path.insert(0, os.getcwd() if self.kind == "module" else os.path.dirname(self.target))
        try:
            if self.kind == "script":
                runpy.run_path(self.target, run_name="__main__")
                return None
            if self.kind == "module":
                runpy.run_module(self.target, run_name="__main__", alter_sys=True)
                return None
            return self.resolve_function()()
        finally:   # a rank's traceback leaves out this runner's frames (`workers.frames`)
            sys.argv, sys.path[:] = saved_argv, saved_path

    def resolve_function(self):
        """Import the file as a module named after it (so that classes it defines pickle)
        and return the (possibly dotted) attribute named ``function``."""
        name = module_name(self.target)
        if getattr(sys.modules.get(name), "__file__", self.target) != self.target:
            name = f"__notebook_launcher_{name}__"   # never replace a module already in use (json.py)
        spec = importlib.util.spec_from_file_location(name, self.target)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        value = module
        for part in self.function.split("."):
            value = getattr(value, part)
        if not callable(value):
            raise TypeError(f"{self.target}:{self.function} is a {type(value).__name__}, not a function")
        return value

    def describe(self) -> str:
        return {"script": self.target, "module": f"-m {self.target}",
                "function": f"{self.target}:{self.function}"}[self.kind]


def module_name(path: str) -> str:
    """The name a file is imported under: its stem (``train.py`` -> ``train``)."""
    return os.path.splitext(os.path.basename(path))[0]


def script_task(target: str, argv: Sequence[str] = (), module: bool = False) -> ScriptTask:
    """The task for ``run [-m] TARGET ARGS...``, checked without running any of the user's code.

    TARGET is ``path/to/script.py``, ``path/to/file.py:function`` or, with ``module=True``,
    ``package.module``. Raises `LaunchConfigError` saying what to fix.

    Example::

        script_task("train.py", ["--lr", "0.1"])       # ScriptTask("script", "/abs/train.py", argv=(...))
        script_task("train.py:main")                   # calls main() in every worker
        script_task("mypackage.train", module=True)    # like python -m mypackage.train
    """
    argv = tuple(argv)
    if module:
        _check_module(target)
        return ScriptTask("module", target, argv=argv)
    path, sep, function = target.rpartition(":")
    if sep and path.endswith(".py") and function:
        path = _existing_file(path)
        _check_defines(path, _parse(path), function)
        return ScriptTask("function", path, function, argv)
    path = _existing_file(target)
    _parse(path)
    return ScriptTask("script", path, argv=argv)


def _existing_file(path: str) -> str:
    if os.path.isfile(path):
        return os.path.abspath(path)
    hint = " To run a module, use -m." if not path.endswith(".py") and "/" not in path else ""
    raise LaunchConfigError(f"{path}: no such file. Give a Python script, path/to/file.py:function, "
                            f"or -m package.module.{hint}")


def _parse(path: str) -> ast.Module:
    try:
        with open(path, "rb") as file:
            return ast.parse(file.read(), filename=path)
    except SyntaxError as exc:
        raise LaunchConfigError(f"{path}, line {exc.lineno}: SyntaxError: {exc.msg}. Fix the file; no process "
                                "was started.") from None
    except (OSError, ValueError) as exc:
        raise LaunchConfigError(f"{path}: cannot be read as Python: {exc}") from None


def _check_defines(path: str, tree: ast.Module, function: str) -> None:
    first = function.split(".")[0]
    names = _top_level_names(tree.body)
    if names is None or first in names:
        return
    listed = ", ".join(sorted(n for n in names if not n.startswith("_"))) or "none"
    raise LaunchConfigError(f"{path} defines no top-level `{first}` (its top-level names: {listed}).")


def _top_level_names(body: list) -> Optional[set]:
    """Names a module body binds (looking into if/try/with blocks, not into functions);
    None when a ``from x import *`` makes that unknowable."""
    names = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == "*" for alias in node.names):
                return None
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
        if isinstance(node, _BLOCKS):
            for block in ("body", "orelse", "finalbody", "handlers"):
                inner = _top_level_names(getattr(node, block, []))
                if inner is None:
                    return None
                names |= inner
    return names


_BLOCKS = (ast.If, ast.Try, ast.With, ast.ExceptHandler, getattr(ast, "TryStar", ast.Try))


def _check_module(name: str) -> None:
    """Find the module the way ``python -m`` would, without importing (running) any package."""
    spec = None
    try:
        spec = _find_spec(name)
    except (ImportError, ValueError) as exc:
        raise LaunchConfigError(f"-m {name}: {exc}") from None
    if spec is None:
        raise LaunchConfigError(f"-m {name}: no module named {name!r} here (sys.path starts with "
                                f"{sys.path[0]!r}). Run from the folder that contains it, or install it.")
    if spec.submodule_search_locations is not None and _find_spec(f"{name}.__main__") is None:
        raise LaunchConfigError(f"-m {name}: {name!r} is a package without a __main__ module; "
                                "name the module inside it to run.")


def _find_spec(name: str):
    parts = name.split(".")
    spec = importlib.util.find_spec(parts[0])
    for part in parts[1:]:
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(part, list(spec.submodule_search_locations))
    return spec
