"""How a command ends: its exit codes, the errors that end it with one line, and the one
wrapper every command-line entry point uses to turn those errors into that line.

Free of JAX and NumPy: `prepare`'s workers, `fatal_filter` and `launch/` use it too.
"""

from __future__ import annotations

import sys
import typing

# Exit codes of every command. After EXIT_INTERRUPTED, EXIT_PEER and EXIT_ABORTED the same
# command resumes from the newest checkpoint: `launch/` requeues or reruns on them.
EXIT_OK = 0
EXIT_BAD_INPUT = 2  # one line on stderr says what to change; nothing was changed
EXIT_NONFINITE = 3  # `max_nonfinite` consecutive non-finite updates; the newest checkpoint is the last good state
EXIT_INTERRUPTED = 75  # SIGTERM/SIGINT, after every process saved (or agreed that nothing new needed saving)
EXIT_PEER = 76  # a process of the group died, was stuck or never joined
EXIT_ABORTED = 134  # JAX's SIGABRT: it ended this process because another one of the group died
RESUMABLE = (EXIT_INTERRUPTED, EXIT_PEER, EXIT_ABORTED)


class Failure(Exception):
    """An expected end of a command: its message is the one line printed, `exit_code` the code."""

    exit_code = EXIT_BAD_INPUT


class UserError(Failure):
    """Bad input (settings, data, checkpoints, paths): the message says what was wrong and
    what to do; the command changed nothing."""


class ConfigError(UserError):
    """A setting or argument that cannot work; the message names it."""


class DataError(UserError):
    """A dataset, a text or a prompt that cannot be read or encoded."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or that this run cannot continue."""


class OutputError(UserError):
    """A place the command must write (out_dir, --to, --out) that cannot be written."""


class LayoutError(ConfigError):
    """A device or batch layout that cannot work; the message says what to change."""


class ProcessSetupError(UserError):
    """Process settings that cannot form a group, or processes started differently."""


class HFError(UserError):
    """A Hugging Face checkpoint this model cannot load; the message names the field."""


class NonFiniteError(Failure):
    exit_code = EXIT_NONFINITE


def run_cli(body: typing.Callable[[list[str]], int], argv: list[str] | None = None,
            leave: typing.Callable[[str, int], None] | None = None) -> int:
    """`body(argv)` (default: sys.argv[1:]); a Failure becomes "error: <message>" on stderr
    and its exit code, and so does an OSError that no layer below turned into a Failure (a
    file that cannot be read or written: bad input too). `leave(line, code)`, when given,
    is called first and may end the process itself (a process of a group must not wait
    for the others in JAX's shutdown)."""
    try:
        return body(sys.argv[1:] if argv is None else argv)
    except (Failure, OSError) as e:
        if isinstance(e, OSError):
            e = OutputError(f"{e.filename or ''}: {e.strerror or e}: check the path, its permissions and free "
                            f"disk space".lstrip(": "))
        if leave is not None:
            leave(str(e), e.exit_code)
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
