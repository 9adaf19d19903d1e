"""Errors that mean "the user must change something", reported as one line (exit code 2)."""

from eftnas_cli.recipe import RecipeError
from eftnas_cli.rundir import UpstreamError


class UserError(Exception):
    """A stage found an input it cannot use (a bad subnet file, an unreachable budget...)."""


# FileNotFoundError covers missing recipes, model folders and data; ValueError covers bad task
# names and malformed subnet JSON raised by the loaders.
USER_ERRORS: tuple[type[BaseException], ...] = (RecipeError, UpstreamError, UserError, FileNotFoundError, ValueError)
