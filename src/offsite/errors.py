"""The one exception type the CLI turns into a clean one-line error."""


class OffsiteError(Exception):
    """A problem the user can fix: bad flag, bad file, mismatched artifacts.

    The message is complete on its own: it names the flag, file or field, the
    value that was given and what to do instead.
    """


class ConfigError(OffsiteError, ValueError):
    """One or more invalid settings, all reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def check(problems: list[str]) -> None:
    """Raise a ConfigError if any problem was collected."""
    if problems:
        raise ConfigError(problems)
