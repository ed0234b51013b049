"""Making other libraries see the job our workers are part of.

HF accelerate decides "distributed on CPU" only when asked with ``cpu=True``: its
`Accelerator()` reads ``ACCELERATE_USE_CPU`` (which the launcher sets), but a plain
`PartialState()` in a CPU worker would see one process. So, in CPU workers, the shared
state is created with ``cpu=True`` as soon as ``accelerate.state`` exists; any
`PartialState()`/`Accelerator()` made later by the user joins it and sees the real world.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def prepare_accelerate(cpu: bool) -> None:
    """Call in every worker after the process group is ready.

    A forked worker inherits whatever accelerate state the notebook already created (a
    one-process state): it is dropped, so accelerate starts over inside the job. On CPU
    the shared state is then created with ``cpu=True``.
    """
    module = sys.modules.get("accelerate.state")
    if module is not None:
        _reset_inherited_state(module)
        if cpu:
            _share_cpu_state(module)
    elif cpu and importlib.util.find_spec("accelerate") is not None:
        sys.meta_path.insert(0, _RunAfterImport("accelerate.state", _share_cpu_state))


def _reset_inherited_state(state_module) -> None:
    state_module.AcceleratorState._reset_state(reset_partial_state=True)
    state_module.GradientState._reset_state()


def _share_cpu_state(state_module) -> None:
    if not state_module.PartialState._shared_state:
        state_module.PartialState(cpu=True)


class _RunAfterImport(importlib.abc.MetaPathFinder):
    """Run ``hook(module)`` right after the module ``name`` is first imported."""

    def __init__(self, name: str, hook) -> None:
        self.name, self.hook = name, hook

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, hook = spec.loader, self.hook
        original = loader.exec_module

        def exec_module(module):
            original(module)
            hook(module)

        loader.exec_module = exec_module
        return spec
