"""User-facing errors.

Every problem a user can fix (bad input, a path that exists, an unsupported adapter feature) is
raised as :class:`HydraoptError` with a one-line, actionable message; the CLI prints it and exits
non-zero. Programming errors stay ordinary exceptions so they keep their tracebacks.
"""


class HydraoptError(ValueError):
    """An input or usage problem the user can act on."""
