"""DataError and DataWarning: how the data layer reports problems.

DataError: every stage (asset fetching, preparation, loading) raises it for problems the
user must fix: a missing file, a tokenizer mismatch, damaged shards or manifest, a config
that cannot work. The message always names the file or setting and says how to fix it, so
the tools and train.py print it as is instead of a traceback.

DataWarning: something the run can go on with but the user should know, e.g. a validation
split shorter than data.val_tokens. Emitted with `warnings.warn(message, DataWarning)`;
the message also says how to silence it (by fixing the cause).
"""

from __future__ import annotations


class DataError(RuntimeError):
    """A data/tokenizer problem the user must fix; the message says how."""


class DataWarning(UserWarning):
    """A data problem the run works around (the message says how, and how to fix it)."""
