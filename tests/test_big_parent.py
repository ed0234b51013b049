"""A launch from a big notebook (lightning and accelerate imported: about 4,500 modules)
costs a forked rank no more than from a small one.

A forked rank shares the notebook's memory copy-on-write: code in the rank that walks
every module or logger writes a reference count on each, and each write copies a page
(20-35 ms per rank in such a notebook; issue 18). What a rank must change there (the
modules holding Lightning's "interactive" flag, IPython's display, logging handlers on the
kernel's streams) is found without that walk. Counted here in page faults, which the
kernel counts exactly, not in time: a walk over the modules costs thousands.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap

from kernel_harness import REPO, Kernel

# A parent as a kernel has it: a prompt (so Lightning decides "interactive" at import), an
# IPython shell, lightning and accelerate imported; then one forked rank's own setup.
RANK_SETUP_FAULTS = textwrap.dedent("""
    import json, logging, os, resource, sys
    sys.ps1 = ">>> "
    import torch, lightning, lightning.pytorch, accelerate
    from IPython.core.interactiveshell import InteractiveShell
    InteractiveShell.instance()
    from notebook_launcher.workers import bootstrap, noninteractive
    logging.getLogger("mylib").addHandler(logging.StreamHandler())   # on this process's stderr

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    noninteractive.before_fork()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            start = faults()
            noninteractive.behave_as_a_script()
            behaved = faults()
            bootstrap._reattach_log_handlers({id(sys.stdout): "stdout", id(sys.stderr): "stderr"})
            reattached = faults()
            import lightning.pytorch.trainer.connectors.accelerator_connector as trainer_side
            stream = logging.getLogger("mylib").handlers[0].stream
            os.write(write, json.dumps({"behave": behaved - start, "reattach": reattached - behaved,
                                        "modules": len(sys.modules), "loggers": len(logging.root.manager.loggerDict),
                                        "flag": trainer_side._IS_INTERACTIVE,
                                        "handler follows": stream is sys.stderr}).encode())
            code = 0
        finally:
            os._exit(code)
    noninteractive.after_fork()
    os.close(write)
    status = os.waitpid(pid, 0)[1]
    print("RANK", os.read(read, 4096).decode(), "STATUS", status)
""")


def test_a_forked_rank_sets_itself_up_without_walking_the_notebooks_modules():
    done = subprocess.run([sys.executable, "-c", RANK_SETUP_FAULTS], cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=180)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RANK ")), None)
    assert line is not None and line.endswith("STATUS 0"), done.stdout[-2000:] + done.stderr[-3000:]
    rank = json.loads(line[len("RANK "):-len("STATUS 0")])
    assert rank["modules"] > 3000 and rank["loggers"] > 300, rank     # the big parent this is about
    assert rank["flag"] is False and rank["handler follows"] is True, rank   # what the setup is for
    # Walking the modules faulted about 2,700 times, walking the loggers about 630; what
    # the rank changes takes about 120 and 60.
    assert rank["behave"] < 600, rank
    assert rank["reattach"] < 300, rank


def test_lightning_imported_after_a_launch_is_seen_at_the_next_one():
    """The modules holding Lightning's flag are looked up once per set of imported modules:
    a module imported between two launches is found at the second."""
    with Kernel(startup="import sys\nfrom notebook_launcher import notebook_launcher") as kernel:
        result = kernel.run(textwrap.dedent("""
            import lightning
            def flags(*names):
                import sys
                return [sys.modules[name]._IS_INTERACTIVE for name in names]
            print("FIRST", notebook_launcher(flags, args=("lightning.fabric.connector",), num_processes=2,
                                             device="cpu", display="none"))
            import lightning_fabric.connector   # the standalone package: its own copies of the flag
            print("SECOND", notebook_launcher(flags, args=("lightning.fabric.connector", "lightning_fabric.connector"),
                                              num_processes=2, device="cpu", display="none"))
        """), timeout=180)
        assert result.status == "ok", result.traceback[-3000:] + result.text[-3000:]
        assert "FIRST [False]" in result.stdout and "SECOND [False, False]" in result.stdout, result.text[-3000:]
        assert kernel.value("lightning_fabric.connector._IS_INTERACTIVE") is True   # the notebook is still interactive
        assert kernel.wait_no_descendants() == []


def test_every_binding_of_ipythons_display_gives_a_handle_in_a_rank():
    """IPython's display is changed in a rank as one function object, so every name bound
    to it behaves as a script's display: builtins, a library module that imported it, a
    dict that holds it, an import made in the rank."""
    with Kernel(startup="import sys\nfrom notebook_launcher import notebook_launcher") as kernel:
        result = kernel.run(textwrap.dedent("""
            import types
            from IPython.display import display as imported
            library = types.ModuleType("some_progress_library")   # as fastprogress binds it
            library.display = imported
            sys.modules["some_progress_library"] = library
            shows = {"show": imported}

            def handles():
                import some_progress_library
                from IPython.core.display_functions import display as in_rank
                ways = {"builtins": display, "library": some_progress_library.display,
                        "dict": shows["show"], "in rank": in_rank}
                return {name: type(way(f"shown via {name}", display_id=True)).__name__ for name, way in ways.items()}
            print("HANDLES", notebook_launcher(handles, num_processes=2, device="cpu", display="none"))
        """), timeout=120)
        assert result.status == "ok", result.traceback[-3000:] + result.text[-3000:]
        line = next(l for l in result.stdout.splitlines() if l.startswith("HANDLES "))
        assert set(ast.literal_eval(line[len("HANDLES "):]).values()) == {"DisplayHandle"}, line
        for way in ("builtins", "library", "dict", "in rank"):
            assert f"[rank0]: shown via {way}" in result.stdout, result.stdout[-2000:]
        assert result.displays == []                        # nothing reached the notebook's front end
        shown = kernel.run("sys.modules['some_progress_library'].display('the notebook still displays')")
        assert "the notebook still displays" in str(shown.displays), shown.text   # the kernel's own is untouched
        assert kernel.wait_no_descendants() == []
