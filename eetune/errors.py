"""The one error type for user mistakes: the CLI prints it on one line and exits 2."""


class EetuneError(Exception):
    """A problem with the user's input (config, files, checkpoints, requests).

    The message says what is wrong and how to fix it; no traceback is shown.
    """
