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

The worker also inherits the kernel's IPython shell, and with it the kernel's way to the
browser: ``IPython.get_ipython()`` answers "a Jupyter kernel" (tqdm.auto, HF
transformers' ``is_in_notebook()``, rich ask that way), and what the shell publishes
(``display()``, widgets) goes through sockets that belong to the kernel process. From a
forked process those messages never reach the notebook: a tqdm.auto bar in each rank
showed nothing in the cell and printed pages of raw message dicts into the kernel's own
output (the Jupyter server's log). So in a worker there is no shell (``get_ipython()``,
from IPython or from the notebook's namespace, is None), ``display(x)`` prints ``x`` as
in a script (and still hands back a handle when asked for one), widgets use comm's own
dummy comm, and tqdm's notebook bars, chosen in the notebook or by tqdm's own check
(which looks only at whether ``ipykernel.zmqshell`` is imported), become its console
bars, in the rank's output like every other line. HF transformers decided in the
notebook too (a cached ``is_in_notebook()``, and its Trainer's HTML progress table): a
rank asks again and gets console bars. A bar class taken from tqdm.auto before the
launch (huggingface_hub's, datasets') stays a notebook bar: its widget reaches nobody,
and the rank prints it once, frozen.

None of this may cost a forked rank time in proportion to what the notebook imported:
a rank shares the kernel's memory copy-on-write, so merely walking every module (a
reference count written on each) copies thousands of pages, 20-35 ms per rank with
lightning and accelerate imported (4,000 modules). So a rank touches only what it
changes: the modules holding Lightning's flag are found in the parent before the fork
(`before_fork`, cached while no module is imported), and ``display`` is changed in the
one function object that every module's ``display`` name refers to.
"""

from __future__ import annotations

import sys
import types
from typing import Optional

from ..integrations import _RunAfterImport

# Lightning's cached answer to "interactive?", and the modules that compute it.
LIGHTNING_FLAG = "_IS_INTERACTIVE"
LIGHTNING_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning")
LIGHTNING_FLAG_MODULES = ("lightning.fabric.utilities.imports", "lightning_fabric.utilities.imports")
_LIGHTNING_PREFIXES = tuple(p + tail for p in LIGHTNING_PACKAGES for tail in ("", "."))
TQDM_CHOOSER = "tqdm.autonotebook"   # picks tqdm.notebook or tqdm.std once, at import
HF_NOTEBOOK_CHECK = "transformers.utils.import_utils"   # is_in_notebook(), cached once asked
HF_TRAINER = "transformers.trainer"   # picks its progress callback (an HTML table or tqdm) at import


def behave_as_a_script() -> None:
    """Make this worker look like ``python script.py`` to libraries that ask. Call once,
    early in a worker, before the user's function runs.

    ``sys.ps1`` and ``sys.ps2`` go away, and Lightning's cached flag becomes False in
    every module that already holds it (found by the parent before it forked this
    worker, `before_fork`; else looked up here). ``sys.flags.interactive`` cannot be
    changed: where it is set (a worker of ``python -i``), Lightning's flag is also
    corrected right after a later import computes it.

    Example::

        behave_as_a_script()
        hasattr(sys, "ps1")   # False
    """
    for prompt in ("ps1", "ps2"):  # only an interactive interpreter has prompts
        if hasattr(sys, prompt):
            delattr(sys, prompt)
    holders = _FORK_SURVEY if _FORK_SURVEY is not None else lightning_flag_holders()
    for name in holders:
        module = sys.modules.get(name)
        if getattr(module, LIGHTNING_FLAG, False):
            setattr(module, LIGHTNING_FLAG, False)
    if sys.flags.interactive:
        for name in LIGHTNING_FLAG_MODULES:
            if name not in sys.modules:
                sys.meta_path.insert(0, _RunAfterImport(name, _clear_lightning_flag))
    if "IPython" in sys.modules:   # forked from a kernel (or an IPython shell)
        try:
            _leave_the_kernels_front_end()
        except Exception as exc:   # a tidy-up for other libraries' sake: never a reason to fail
            print(f"notebook_launcher: this rank still sees the kernel's IPython "
                  f"({type(exc).__name__}: {exc})", file=sys.stderr)


def _clear_lightning_flag(module) -> None:
    setattr(module, LIGHTNING_FLAG, False)


# ----------------------------------------------------------------- before the fork
# The names of the modules holding Lightning's flag, found by the parent right before it
# forks ranks: a forked rank inherits this and never walks sys.modules itself. None
# outside `before_fork`/`after_fork` (and in a spawned rank): a rank then looks itself.
_FORK_SURVEY: Optional[tuple] = None
_holders_cache: tuple = (-1, ())   # (len(sys.modules) when surveyed, the holders' names)


def before_fork() -> None:
    """Parent side, right before forking ranks: find what `behave_as_a_script` will change
    in them, so that they inherit the answer (see the module docstring). Pair with
    `after_fork`.

    Example::

        before_fork()
        try:
            ...fork the ranks...
        finally:
            after_fork()
    """
    global _FORK_SURVEY
    _FORK_SURVEY = lightning_flag_holders()


def after_fork() -> None:
    """The forks are done: a later fork that does not call `before_fork` looks for itself."""
    global _FORK_SURVEY
    _FORK_SURVEY = None


def lightning_flag_holders() -> tuple:
    """The names of the Lightning modules that hold a copy of its ``_IS_INTERACTIVE`` flag.

    Nothing when Lightning decided "not a session" (a plain process) or is not imported:
    every copy was taken from its own module's answer. Else Lightning's modules are looked
    up by name, once per set of imported modules: the answer is kept while the number of
    modules in ``sys.modules`` stays the same (a module imported since adds one; one
    removed and another imported between two launches would be missed). Reading names
    only, never every module's attributes: 1 ms for 4,000 modules, where reading each
    module took 10 ms.

    Example::

        import lightning                  # in a kernel: Lightning decides "interactive"
        lightning_flag_holders()          # ('lightning.fabric.connector', ...)
    """
    global _holders_cache
    if not any(getattr(sys.modules.get(name), LIGHTNING_FLAG, False) for name in LIGHTNING_FLAG_MODULES):
        return ()
    count = len(sys.modules)
    if _holders_cache[0] != count:
        names = [name for name in list(sys.modules) if name.startswith(_LIGHTNING_PREFIXES)]
        _holders_cache = (count, tuple(name for name in names if _holds_flag(sys.modules.get(name))))
    return _holders_cache[1]


def _holds_flag(module) -> bool:
    namespace = getattr(module, "__dict__", None)   # never a module's __getattr__ (lazy imports)
    return isinstance(namespace, dict) and LIGHTNING_FLAG in namespace


def _leave_the_kernels_front_end() -> None:
    """No shell, no kernel comms, a display() that prints, console progress bars from tqdm
    and HF's Trainer (see the module docstring)."""
    import builtins

    import IPython
    from IPython.core.interactiveshell import InteractiveShell

    if InteractiveShell.initialized():
        InteractiveShell.clear_instance()   # IPython.get_ipython() is None from now on
    for name in ("get_ipython", "__IPYTHON__"):   # what the shell put into builtins
        builtins.__dict__.pop(name, None)
    main = vars(sys.modules["__main__"])
    if "get_ipython" in main:   # the kernel's namespace has its own: functions from the notebook use it
        main["get_ipython"] = IPython.get_ipython
    _script_display()
    comm = sys.modules.get("comm")
    if comm is not None:   # a widget made in a rank (a bar class taken before the launch) talks to nobody
        comm.create_comm, comm.get_comm_manager = comm._create_comm, comm._get_comm_manager
    if TQDM_CHOOSER in sys.modules:
        _console_tqdm(sys.modules[TQDM_CHOOSER])
    else:   # its notebook branch still runs then (it imports ipywidgets), and is undone at once
        sys.meta_path.insert(0, _RunAfterImport(TQDM_CHOOSER, _console_tqdm))
    _forget_transformers_notebook()


def _script_display() -> None:
    """IPython's display() without a shell prints its objects, and returns None even when
    asked for a handle: notebook code that updates one (fastprogress' bars, HF's progress
    table) would crash in a rank. Ours prints what a script would, returns the handle,
    and ignores updates (a script cannot redraw a line it printed).

    It must reach every name bound to IPython's display: builtins, IPython's modules, the
    notebook's namespace, modules that imported it by name, bindings made later. So the
    function object itself changes, not the names: its code becomes a call of ours, and a
    copy of the original does the printing. (Rebinding the name module by module read
    every module in each rank: 20-35 ms with lightning and accelerate imported.)"""
    from IPython.core import display_functions

    display = display_functions.display
    if getattr(display, "_notebook_launcher_script", False) or not isinstance(display, types.FunctionType) \
            or display.__closure__:
        return   # done already, or not IPython's own function (wrapped by someone): left alone
    printing = types.FunctionType(display.__code__, display.__globals__, display.__name__,
                                  display.__defaults__, display.__closure__)
    printing.__kwdefaults__ = display.__kwdefaults__

    def script_display(*objs, display_id=None, update=False, **kwargs):
        if update:
            return None
        printing(*objs, **kwargs)
        if display_id:
            return display_functions.DisplayHandle(None if display_id is True else display_id)
        return None

    display_functions._notebook_launcher_display = script_display
    display.__code__ = _calls_script_display.__code__
    display._notebook_launcher_script = True


def _calls_script_display(*objs, **kwargs):
    """The code of IPython's display() in a rank (`_script_display`). It runs as IPython's
    function, so its global names are looked up in IPython.core.display_functions."""
    return _notebook_launcher_display(*objs, **kwargs)  # noqa: F821  (set there by _script_display)


def _forget_transformers_notebook() -> None:
    """HF transformers answers ``is_in_notebook()`` once (an lru_cache), and its Trainer
    shows progress as a notebook HTML table when transformers.trainer was imported in a
    kernel: in a rank that table could only print ``<IPython.core.display.HTML object>``
    lines. The answer is asked again here, and the Trainer gets the console bars a script
    gets (tqdm, on rank 0's output)."""
    check = getattr(sys.modules.get(HF_NOTEBOOK_CHECK), "is_in_notebook", None)
    if hasattr(check, "cache_clear"):
        check.cache_clear()
    trainer = sys.modules.get(HF_TRAINER)
    notebook = getattr(trainer, "NotebookProgressCallback", None)
    if notebook is not None and getattr(trainer, "DEFAULT_PROGRESS_CALLBACK", None) is notebook:
        trainer.DEFAULT_PROGRESS_CALLBACK = trainer.ProgressCallback


def _console_tqdm(chooser) -> None:
    """Undo tqdm.autonotebook's choice of notebook bars, and tqdm.auto's with it (its
    ``trange`` reads the module's ``tqdm`` when called). A class taken from them in the
    notebook before the launch stays a notebook bar, now talking to nobody."""
    from tqdm import std

    if getattr(chooser, "tqdm", std.tqdm) is std.tqdm:
        return
    chooser.tqdm, chooser.trange = std.tqdm, std.trange
    auto = sys.modules.get("tqdm.auto")
    if auto is not None:
        from tqdm.asyncio import tqdm as asyncio_tqdm

        auto.tqdm = asyncio_tqdm   # what tqdm.auto itself picks outside a notebook
