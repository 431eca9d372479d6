"""The error a world raises when the configured URLs cannot publish it (the stage reports it as one line)."""


class WorldError(ValueError):
    """A role without a URL, a URL the world has no file for, two files at one mirror path."""
