"""The one base class of mistakes a user can fix. The CLI prints these as one line, never a traceback."""


class UserError(Exception):
    """What was wrong, where (file:line, key or field), and what to do."""
