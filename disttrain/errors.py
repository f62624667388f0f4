"""Errors disttrain raises for things the user can fix."""


class ConfigError(ValueError):
    """A configuration value that cannot work. The message names the value, what is allowed,
    and how to fix it. Raised before any process group or model is built, on every rank."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step."""
