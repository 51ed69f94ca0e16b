"""One exception type for every user-facing problem.

The CLI catches :class:`CfjaxError` and prints its message as one line with a non-zero exit;
the Python API raises it. It subclasses ``ValueError`` so generic callers can catch it too.
"""


class CfjaxError(ValueError):
    """A problem with the user's input (data, shapes, checkpoints, names): the message says which.

    ``argument``: the name of the argument (or config field) at fault, when there is one; the
    CLI maps it to its flag.
    """

    def __init__(self, message: str = "", argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class CheckpointError(CfjaxError):
    """A missing, partial, corrupt or incompatible checkpoint."""
