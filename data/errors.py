"""DataError: the one exception type of the data layer.

Every stage (asset fetching, preparation, loading) raises it for problems the user
must fix: a missing file, a tokenizer mismatch, damaged shards, a config that cannot
work. The message always says how to fix it, so the tools and train.py print it as
is instead of a traceback.
"""

from __future__ import annotations


class DataError(RuntimeError):
    """A data/tokenizer problem the user must fix; the message says how."""
