"""Which frames of a rank's stack are the user's: one rule for tracebacks and stall reports.

A rank's stack is, from the outside in (a forked rank's main thread also shows the
frames of the parent that forked it, outside its ``worker_main``: those go first): the process machinery (multiprocess's bootstrap,
runpy and importlib for scripts, threading for threads), our worker loop (`bootstrap`,
`tasks`, `script_task`), then the user's own code and whatever it calls (torch, and
sometimes our toolkit: `Accelerator`, `report()`). The person should see their code from
its first frame inward, never the loop that called it, so:

- **the rule**: drop the outermost run of *launcher frames* (`is_launcher_frame`); what is
  left is the user's part. Frames of ours *inside* the user's part stay: a rank stuck in
  ``accelerator.gather()`` shows that call.
- **the hand-over**: the user's part is real only when the last launcher frame is one that
  calls user code (`HANDOVER`: a task's ``run``, the script runner, runpy, importlib, a
  thread's ``run``). Otherwise the rank is inside the launcher's own work (forming the
  process group, the final barrier, waiting for the next cell), and `where` says so in
  words instead of showing torch frames the user never called.

`bootstrap` uses it for the tracebacks of failed tasks, `stacks` for stall reports.

Example::

    frames = [Frame(".../multiprocess/process.py", "_bootstrap"),
              Frame(".../notebook_launcher/workers/bootstrap.py", "_run_task"),
              Frame(".../notebook_launcher/workers/tasks.py", "run"),
              Frame("/tmp/ipykernel_1/123.py", "train")]
    user_part(frames)      # ([Frame(".../123.py", "train")], "")
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_MACHINERY = ("<frozen runpy", "<frozen importlib")  # runpy and importlib internals
_MACHINERY_FILES = ("runpy.py", "threading.py")
_MACHINERY_PACKAGES = (f"{os.sep}multiprocess{os.sep}", f"{os.sep}multiprocessing{os.sep}")

# (file name, function) of the launcher frames that call user code.
HANDOVER = {("tasks.py", "run"), ("script_task.py", "__call__"), ("script_task.py", "resolve_function"),
            ("runpy.py", "_run_code"), ("<frozen runpy>", "_run_code"),
            ("<frozen importlib._bootstrap_external>", "exec_module"),
            ("<frozen importlib._bootstrap>", "_call_with_frames_removed"), ("threading.py", "run")}

# What a rank is doing when it is inside the launcher's own work, by its innermost launcher function.
_DOING = {
    "_finish_together": "finished the function (waiting for the other ranks to finish it)",
    "_tasks": "between tasks (waiting for the next call)",
    "_serve": "between tasks (waiting for the next call)",
    "_prepare": "setting up (forming the process group)",
    "_init_process_group": "setting up (forming the process group)",
    "_send_result": "sending its result",
    "_report_error": "reporting its error",
}


_WAITING = (_DOING["_finish_together"], _DOING["_tasks"])


def waiting_in_the_launcher(stack_text: str) -> bool:
    """Whether a tidied stack says the rank waits in the launcher (the final barrier, or
    between tasks): such a rank is never the one the others wait for."""
    return any(f"({doing})" in stack_text for doing in _WAITING)


@dataclass(frozen=True)
class Frame:
    filename: str
    function: str
    line: int = 0


def is_launcher_frame(filename: str) -> bool:
    """A frame of ours or of the machinery that starts a process, a script or a thread."""
    return (filename.startswith(_PACKAGE_DIR) or filename.startswith(_MACHINERY)
            or os.path.basename(filename) in _MACHINERY_FILES
            or any(part in filename for part in _MACHINERY_PACKAGES))


def _handover(frame: Frame) -> bool:
    name = frame.filename if frame.filename.startswith("<") else os.path.basename(frame.filename)
    return (name, frame.function) in HANDOVER


def user_part(frames: list) -> tuple:
    """(the user's frames, outermost first; "" or what the rank is doing instead) for a
    stack given outermost first.

    Example::

        user_part(frames_of_a_rank_in_the_final_barrier)
        # ([], "finished the function (waiting for the other ranks to finish it)")
    """
    frames = _from_the_worker_entry(frames)
    outer = 0
    while outer < len(frames) and is_launcher_frame(frames[outer].filename):
        outer += 1
    if outer == len(frames):
        innermost = frames[-1].function if frames else ""
        return [], _DOING.get(innermost, "in the launcher")
    if outer and not _handover(frames[outer - 1]):
        return [], _DOING.get(frames[outer - 1].function, "in the launcher")
    return frames[outer:], ""


def _from_the_worker_entry(frames: list) -> list:
    """A forked rank's main thread still shows the frames of the parent that forked it
    (pytest's, the kernel's event loop, the cell that launched): its own life starts at the
    innermost ``worker_main``."""
    for index in range(len(frames) - 1, -1, -1):
        frame = frames[index]
        if frame.function == "worker_main" and frame.filename.startswith(_PACKAGE_DIR):
            return frames[index:]
    return frames


def is_thread_entry(frames: list) -> bool:
    """Whether a stack (outermost first) is a thread's, not the main thread's."""
    return bool(frames) and os.path.basename(frames[0].filename) == "threading.py"


def user_traceback(tb):
    """A traceback without its outermost launcher frames: it starts at the user's own
    code, as ``python script.py`` shows it (`user_part`'s rule). An error of ours, raised
    where no user frame is, keeps no frame: its message says what happened."""
    while tb is not None and is_launcher_frame(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb
