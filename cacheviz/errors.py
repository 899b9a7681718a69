"""The one exception type the engine raises for bad user input.

Every message is one sentence that names the fix; the CLI and the app print it as is.
"""


class CachevizError(ValueError):
    """Bad input or a missing resource; the message says what to do about it."""
