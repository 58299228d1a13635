"""One exception type for user-facing errors: the CLI prints its message on one line, no traceback."""


class LeanLMError(Exception):
    """A problem with the user's input (which file, what is wrong, what to do)."""
