"""The one error type for bad user input."""

from __future__ import annotations


class ConfigError(Exception):
    """A problem (or several) with the user's configuration or files.

    Each problem is one line that starts with the dotted YAML path or file it is about.
    The CLI prints the lines and exits with code 2, never a traceback.
    """

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))
