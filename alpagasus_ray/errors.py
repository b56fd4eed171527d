"""The two errors a user's input can cause; the CLI prints their message alone and exits 2."""


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the key."""


class InputError(ValueError):
    """An input that cannot be read at all. The message names the file (and line) and what to do."""
