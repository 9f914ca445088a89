"""Errors meant for the person running the workflow: the message names the culprit and the fix.

Entry scripts catch TunesmithError and print only its message; anything else is a bug and keeps
its traceback."""


class TunesmithError(Exception):
    """A problem with the user's input, recipe or environment."""


class RecipeError(TunesmithError):
    """A recipe or config.yaml that does not validate."""


class DataError(TunesmithError):
    """Bad input data: the message names file, row and field."""


class EnvironmentNotSupported(TunesmithError):
    """The recipe needs something this machine lacks (CUDA, network, a tool)."""
