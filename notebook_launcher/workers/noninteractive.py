"""A worker is a script, not an interactive session.

A worker forked from a Jupyter kernel inherits the kernel's ``sys.ps1`` (a prompt that
only an interactive interpreter has), although nobody types into it: its stdin is
/dev/null and its stdout a pipe. Libraries read that prompt to decide "interactive", and
Lightning refuses to start its script-style strategies there: ``Fabric(strategy="ddp")``
and ``Trainer(strategy="ddp")`` raise "is not compatible with an interactive
environment", and ``strategy="auto"`` picks a launcher that forks again. Lightning
decides once, when ``lightning.fabric.utilities.imports`` is imported, and every module
that imports ``_IS_INTERACTIVE`` keeps its own copy, so a notebook that imported
lightning before the launch hands the decision down to the workers.

Once a worker behaves as a script, Lightning sees the torchrun environment we set
(``TORCHELASTIC_RUN_ID``, ``RANK``, ...) and joins the process group that is already
initialized instead of starting processes of its own.
"""

from __future__ import annotations

import sys

from ..integrations import _RunAfterImport

# Lightning's cached answer to "interactive?", and the modules that compute it.
LIGHTNING_FLAG = "_IS_INTERACTIVE"
LIGHTNING_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning")
LIGHTNING_FLAG_MODULES = ("lightning.fabric.utilities.imports", "lightning_fabric.utilities.imports")


def behave_as_a_script() -> None:
    """Make this worker look like ``python script.py`` to libraries that ask. Call once,
    early in a worker, before the user's function runs.

    ``sys.ps1`` and ``sys.ps2`` go away, and Lightning's cached flag becomes False in
    every module that already holds it. ``sys.flags.interactive`` cannot be changed:
    where it is set (a worker of ``python -i``), Lightning's flag is also corrected
    right after a later import computes it.

    Example::

        behave_as_a_script()
        hasattr(sys, "ps1")   # False
    """
    for prompt in ("ps1", "ps2"):  # only an interactive interpreter has prompts
        if hasattr(sys, prompt):
            delattr(sys, prompt)
    if any(package in sys.modules for package in LIGHTNING_PACKAGES):  # else skip the scan (1 ms)
        for name, module in list(sys.modules.items()):
            if name.split(".", 1)[0] in LIGHTNING_PACKAGES and getattr(module, LIGHTNING_FLAG, False):
                setattr(module, LIGHTNING_FLAG, False)
    if sys.flags.interactive:
        for name in LIGHTNING_FLAG_MODULES:
            if name not in sys.modules:
                sys.meta_path.insert(0, _RunAfterImport(name, _clear_lightning_flag))


def _clear_lightning_flag(module) -> None:
    setattr(module, LIGHTNING_FLAG, False)
