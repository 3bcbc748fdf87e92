"""Errors the entry points turn into one clear line instead of a traceback."""


class ConfigError(ValueError):
    """A configuration or input the user can fix: the message names the field, the value and what is allowed."""


class OfflineError(ConfigError):
    """Something asked for a download that could not happen; the message says how to pass local files."""
