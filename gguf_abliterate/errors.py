"""The exceptions the CLI turns into one line on stderr and a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input or an impossible request: said to the user without a traceback (exit 1)."""


class Interrupted(Exception):
    """Ctrl-C after the command kept what it had (a search's best so far): said in one line,
    exit 130 as for any interruption, so a script sees the work did not finish."""
