"""The project's error types. Each one means "the user must change something": the command line
reports it as one line and exits with code 2. Any other exception is a bug, reported as a short
message that points at EFTNAS_DEBUG=1 for the traceback, with exit code 1.

The classes also derive from the built-in type they refine (ValueError, FileNotFoundError...), so
that callers of the Python API can catch them either way.
"""


class EftnasError(Exception):
    """Base of every error the user can fix (a recipe key, an input file, a stage to run first)."""


class UserError(EftnasError):
    """A stage found an input it cannot use (a bad subnet file, an unreachable budget...)."""


class RecipeError(EftnasError, ValueError):
    """A recipe the user must fix; the message is one readable line."""


class UpstreamError(EftnasError, RuntimeError):
    """A stage cannot start: something it reads is missing or belongs to another run."""


class ModelNotFoundError(EftnasError, FileNotFoundError):
    """A model name that is neither a model folder, a hub id nor a packaged alias."""


class DataError(EftnasError, FileNotFoundError):
    """Task data that is missing or does not have the task's columns."""


class UnknownTaskError(EftnasError, ValueError):
    """A task name outside the registry."""


class SubnetError(EftnasError, ValueError):
    """A subnet description that is malformed or does not fit the model."""


class UnsupportedModelError(EftnasError, ValueError):
    """A model family the elastic core has no adapter for."""


class ModelConfigError(EftnasError, ValueError):
    """A model folder whose config.json is not valid JSON or not a Hugging Face model config."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while a command held a run directory; `command` names what was running.

    Not an `EftnasError`: nothing is wrong with the input, and it must pass every `except Exception`.
    """

    def __init__(self, command: str):
        super().__init__(command)
        self.command = command
