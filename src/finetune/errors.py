"""Errors the entry points turn into one clear line instead of a traceback."""


class ConfigError(ValueError):
    """A configuration or input the user can fix: the message names the field, the value and what is allowed."""


class OfflineError(ConfigError):
    """Something asked for a download that could not happen; the message says how to pass local files."""


def user_error(err: BaseException) -> ConfigError | None:
    """The ConfigError behind `err` (Hydra's instantiate and Lightning wrap or chain them), if there is one."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
