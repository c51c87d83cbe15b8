"""The error raised for bad user settings: the CLI prints it as one line and exits non-zero."""


class ConfigError(ValueError):
    """A setting is out of range; the message names the CLI flag and the accepted values."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
