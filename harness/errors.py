"""Exceptions of crashlab.

One root, :class:`CrashlabError`. Each subclass carries what a user needs to act on it and
renders as one line. The library never prints or exits; the CLI maps these to exit codes.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_VIOLATION = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_HARNESS_ERROR = 4


class CrashlabError(Exception):
    """Root of every error crashlab raises on purpose."""

    exit_code = EXIT_HARNESS_ERROR


@dataclass(frozen=True)
class Problem:
    """One mistake in an input file: where it is and what is wrong."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ScenarioError(CrashlabError):
    """A scenario file is invalid; holds every problem found in it, not only the first."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line or 0))
        super().__init__("\n".join(str(p) for p in self.problems))


class UsageError(CrashlabError):
    """A command-line argument or input file the user named is wrong."""

    exit_code = EXIT_BAD_INPUT


class EnvironmentProblem(CrashlabError):
    """This machine cannot run what was asked (no engine, no QEMU, no emulation, ...)."""

    exit_code = EXIT_ENVIRONMENT


class TargetError(CrashlabError):
    """A target (process, container, VM) failed in a way that is the harness's, not SQLite's."""

    def __init__(self, message: str, *, target: str = "", status: int | None = None,
                 stderr_tail: str = ""):
        self.target = target
        self.status = status
        self.stderr_tail = stderr_tail
        parts = [message]
        if target:
            parts.append(f"target {target}")
        if status is not None:
            parts.append(f"exit status {status}")
        if stderr_tail:
            parts.append("stderr: " + " | ".join(stderr_tail.strip().splitlines()[-3:]))
        super().__init__("; ".join(parts))


class ImageError(CrashlabError):
    """An image (container or VM) could not be built."""

    exit_code = EXIT_ENVIRONMENT


class Interrupted(CrashlabError):
    """The run was interrupted (Ctrl-C or SIGTERM); results written so far are kept."""

    exit_code = 130
