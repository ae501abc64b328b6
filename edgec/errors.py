"""The one error type users see: a message saying what is wrong and a hint saying how to fix it."""


class EdgecError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line, exit code 2."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
