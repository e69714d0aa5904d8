"""What a user can act on: each error is printed by `megatron-power` as `error: <line>` per line of
its message, without a traceback, and ends the command with its exit code."""


class UserError(Exception):
    exit_code = 2
    # Every rank of a launch meets the same problem (the recipe, the data): rank 0 alone reports it.
    same_on_every_rank = False


class ConfigError(UserError, ValueError):
    """A recipe, override or option is wrong; each line of the message names one problem."""

    same_on_every_rank = True


class DataError(UserError, ValueError):
    """A corpus, tokenizer or indexed dataset that cannot be read: the file, the line, what was wrong."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be saved, found or resumed from."""


class ConversionError(UserError, ValueError):
    """A checkpoint, Hugging Face directory or option that cannot be converted."""


class FitError(UserError, ValueError):
    """A sweep's results table that cannot be fitted."""


class DeviceError(UserError, RuntimeError):
    """This process has no device of its own (a launch with more processes than GPUs); only that
    process knows."""


class NonFiniteError(UserError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or grad norm."""

    exit_code = 3
