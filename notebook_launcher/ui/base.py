"""What every view of a run does. Views only read the `RunState`; the supervisor calls
them from the kernel's main thread."""

from __future__ import annotations

import string
import sys

from ..state import RunState

DEFAULT_PREFIX = "[rank${rank}]: "


class View:
    """Base view: prints worker output lines, rank-prefixed, and nothing else.

    This is what ``display="none"`` shows: the workers' own prints still reach the cell.
    ``prefix`` is a `string.Template` with ``${rank}``, ``${local_rank}``, ``${role_name}``
    (torchrun's ``log_line_prefix_template``).
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self._template = string.Template(prefix)
        self._prefixes: dict = {}

    def prefix(self, rank: int) -> str:
        if rank not in self._prefixes:
            self._prefixes[rank] = self._template.safe_substitute(rank=rank, local_rank=rank, role_name="default")
        return self._prefixes[rank]

    def start(self, state: RunState) -> None:
        """The workers were started."""

    def output(self, rank: int, stream: str, lines: list) -> None:
        """Whole lines a worker wrote to its stdout or stderr."""
        target = sys.stderr if stream == "stderr" else sys.stdout
        prefix = self.prefix(rank)
        target.write("".join(f"{prefix}{line}\n" for line in lines))
        target.flush()

    def refresh(self, state: RunState) -> None:
        """Called often (every event batch and every tick); throttle in the view."""

    def finish(self, state: RunState) -> None:
        """The run ended (succeeded, failed or interrupted); replace live parts with a summary."""
