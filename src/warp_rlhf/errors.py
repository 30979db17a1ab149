"""User-facing errors: each message is one line naming the problem; the CLI exits 2."""


class WarpError(Exception):
    """Bad input that the user can fix; the message is one line."""


class ConfigError(WarpError):
    """A configuration value, file or output folder is invalid."""


class DataError(WarpError):
    """The data cannot be used."""


class ModelError(WarpError):
    """A model or tokenizer cannot be loaded or does not fit its role."""


class AssetError(WarpError):
    """An embedded asset is missing; the message says how to install it."""
