"""The error a user's bad config raises (a leaf module: config.py, which checks the config, and
the data readers, which check a user's files before loading, both raise it)."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the allowed values."""
