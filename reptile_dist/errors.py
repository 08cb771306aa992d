"""The one base class of the errors a user can act on, and the error that stops a run."""
from __future__ import annotations


class UserError(Exception):
    """Raised for bad input or an environment problem the user can fix (a config value out of
    range, a file that is not what it should be, a cluster that cannot be reached).

    The message is one line that names the field, file or address; the CLI prints it as
    `reptile-dist: error: <message>` and exits with code 2. Anything else that escapes a command
    is a bug and keeps its traceback.
    """


class RunFailed(RuntimeError):
    """The run cannot go on (every update rejected for too long, theta no longer finite, an actor
    failing again and again or that cannot be placed); its checkpoints are kept. The CLI prints it
    as one line and exits with code 1."""
