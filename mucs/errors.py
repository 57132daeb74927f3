"""One kind of error for everything a user can fix: printed as one line, exit code 2."""


class UserError(Exception):
    """Bad input or a missing prerequisite. The message says what is wrong and what to do."""

    exit_code = 2

    def __str__(self):
        return " ".join(str(self.args[0]).split()) if self.args else "error"
