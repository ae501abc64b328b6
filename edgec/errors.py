"""The one error type users see: a message saying what is wrong and a hint saying how to fix it."""


class EdgecError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line, exit code 2."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def last_line(error: BaseException) -> str:
    """The last non-empty line of an exception's text: where TVM and protobuf put the actual reason."""
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so cleanup code runs on the way out;
    the CLI exits with the shell's code for it, 128 + the signal number (130, 143, 129)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def last_stderr_line(text: str, fallback: str) -> str:
    """The last non-empty line of a tool's output (pip, a compiler, edgec_run): where it says what went wrong."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else fallback
