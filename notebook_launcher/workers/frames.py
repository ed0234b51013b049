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
- **see-through frames**: our wrappers around the person's calls (the collective journal's,
  `TRANSPARENT`) are left out wherever they are: the person called ``dist.all_reduce``.
- **the hand-over**: the user's part is real only when the last launcher frame is one that
  calls user code (`HANDOVER`: a task's ``run``, the script runner, runpy, importlib, a
  thread's ``run``). Otherwise the rank is inside the launcher's own work (forming the
  process group, the final barrier, waiting for the next cell), and `where` says so in
  words instead of showing torch frames the user never called.

`bootstrap` uses it for the tracebacks of failed tasks, `stacks` for stall reports, and
`whereabouts` says in a few words where a rank is for the roll-call of a stall
(`rollcall`): its innermost frame of the person's own code (not ours, not torch's or
another installed library's: `is_library_file`), named as people name it (`place`:
"cell line 9"), or the launcher's wording when it is in our own work.

Example::

    frames = [Frame(".../multiprocess/process.py", "_bootstrap"),
              Frame(".../notebook_launcher/workers/bootstrap.py", "_run_task"),
              Frame(".../notebook_launcher/workers/tasks.py", "run"),
              Frame("/tmp/ipykernel_1/123.py", "train")]
    user_part(frames)      # ([Frame(".../123.py", "train")], "")
"""

from __future__ import annotations

import os
import re
import sysconfig
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

# (file name, function) of our wrappers around the person's own calls: never shown.
TRANSPARENT = {("journal.py", "journaled")}

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

# Where installed code lives (torch, other libraries, the standard library), and ours.
LIBRARIES = tuple({_PACKAGE_DIR, *(os.path.join(sysconfig.get_paths()[key], "") for key in ("purelib", "platlib", "stdlib"))})
_CELL = re.compile(r"^<dist-cell-\d+>$|^<ipython-input-|ipykernel_\d+[/\\]\d+\.py$")
_TIDIED_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>.*)$')


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


def is_transparent(filename: str, function: str) -> bool:
    """One of our wrappers around a call the person made (`TRANSPARENT`)."""
    return filename.startswith(_PACKAGE_DIR) and (os.path.basename(filename), function) in TRANSPARENT


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
    code, as ``python script.py`` shows it (`user_part`'s rule), and without our
    see-through wrappers (`is_transparent`). An error of ours, raised where no user frame
    is, keeps no frame: its message says what happened."""
    while tb is not None and is_launcher_frame(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    link = tb
    while link is not None and link.tb_next is not None:
        following = link.tb_next
        if is_transparent(following.tb_frame.f_code.co_filename, following.tb_frame.f_code.co_name):
            link.tb_next = following.tb_next
        else:
            link = following
    return tb


def is_library_file(filename: str) -> bool:
    """Installed code (torch, other libraries, the standard library) or ours: not the person's."""
    return filename.startswith(LIBRARIES) or filename.startswith("<frozen ")


def place(filename: str, line: int) -> str:
    """A line as people name it: "cell line 4" in a notebook cell, "train.py line 4" in a file."""
    if _CELL.search(filename):
        return f"cell line {line}"
    return f"{os.path.basename(filename) or filename} line {line}"


def whereabouts(stacks: str) -> str:
    """Where a rank is, in words, from its tidied stacks (`stacks.tidy`, source lines
    added): "at cell line 9 (time.sleep(60))", or the launcher's wording ("finished the
    function", "between tasks") when it is in our own work; "" when the stacks say nothing.

    Example::

        whereabouts('Current thread 0x1 (most recent call first):\n'
                    '  File "<dist-cell-3>", line 9 in <module>\n    time.sleep(60)')
        # 'at cell line 9 (time.sleep(60))'
    """
    current = stacks.split("Current thread", 1)[-1] if "Current thread" in stacks else stacks
    for doing in _DOING.values():
        if f"({doing})" in current:
            return doing.split(" (")[0]
    lines = current.splitlines()
    frames = [(index, m) for index, text in enumerate(lines) if (m := _TIDIED_FRAME.match(text))]
    if not frames:
        return ""
    index, match = next(((i, m) for i, m in frames if not is_library_file(m["file"])), frames[0])
    following = lines[index + 1].strip() if index + 1 < len(lines) else ""
    source = "" if _TIDIED_FRAME.match(lines[index + 1] if index + 1 < len(lines) else "") else following
    where = f"at {place(match['file'], int(match['line']))}"
    return f"{where} ({source})" if source else where
