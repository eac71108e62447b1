"""One error type for every bad input: it names the file and the problem, and the CLI prints it as one line."""
from __future__ import annotations

import os


class ConveyorError(Exception):
    """A problem with a specific file or folder; `str()` is `<path>: <problem>`."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class BadEpisode(ConveyorError):
    """One source episode cannot be converted; the rest of the batch can still land (quarantine)."""

    def __init__(self, path, problem: str, episode_index: int):
        self.episode_index = episode_index
        super().__init__(path, problem)


class StoreLocked(ConveyorError):
    """Another writer holds the store's lock."""
