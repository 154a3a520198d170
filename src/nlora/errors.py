"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class NloraError(Exception):
    """A problem with the user's input (file, row, option): no traceback is shown."""


class DataError(NloraError):
    """Bad or missing benchmark data."""


class ModelError(NloraError):
    """A model that cannot be found or loaded."""


class ConfigError(NloraError):
    """An invalid option or an option that clashes with an existing run."""
