"""User-facing errors.

A :class:`ConKDError` is bad input the user can fix (a config value, a missing file, ...): the
command-line entry points print its message on one line and exit non-zero instead of showing a
traceback. Inside a sweep it is re-raised so the sweeper records the trial as failed.
"""


class ConKDError(Exception):
    """A problem with the user's input, with a message that names the fix."""


class DivergedError(ConKDError):
    """The training loss became NaN or infinite."""


def message(err: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker ("Caught ConKDError in
    DataLoader worker process 0. Original Traceback ..."), only the original message."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[-1] if ": " in last else last
    return text
