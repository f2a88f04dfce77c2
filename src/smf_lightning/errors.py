"""The error a user's bad config raises (a leaf module: config.py, which checks the config, and
the data readers, which check a user's files before loading, both raise it)."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


def need(cond: bool, key: str, value, allowed: str) -> None:
    """ConfigError naming ``key``, its ``value`` and what is ``allowed`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"bad config: {key}={value!r}; allowed: {allowed}. Fix it on the command line, e.g. `{key}=...`.")


def target_class(key: str, target: str, base: type, prefix: str = "") -> type:
    """The class a config's ``_target_`` names, checked to be a subclass of ``base``; a
    ConfigError naming ``key`` otherwise (it cannot be imported, or is something else)."""
    from hydra.utils import get_class

    try:
        cls = get_class(target)
    except Exception as e:  # ImportError, or Hydra's wrapper of it
        raise ConfigError(f"{prefix}{key}._target_={target!r} cannot be imported: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{prefix}{key}._target_={target!r} is not a Lightning {base.__name__} class.")
    return cls
