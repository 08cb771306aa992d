"""The one base class of the errors a user can act on."""
from __future__ import annotations


class UserError(Exception):
    """Raised for bad input or an environment problem the user can fix (a config value out of
    range, a file that is not what it should be, a cluster that cannot be reached).

    The message is one line that names the field, file or address; the CLI prints it as
    `reptile-dist: error: <message>` and exits with code 2. Anything else that escapes a command
    is a bug and keeps its traceback.
    """
