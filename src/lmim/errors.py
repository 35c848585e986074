"""The one exception type lmim raises for bad configuration or input."""


class ConfigError(ValueError):
    """A configuration value or input that cannot work.

    The message names the config key (as written on the command line, e.g. ``model.mask_ratio``)
    and how to fix it. ``python -m lmim.train`` prints it on one line and exits with status 2
    before anything is trained or written.
    """
