"""Text data: sources, the tokenizer, prepared token shards and the batches read from them.

store.py finds and reuses prepared directories (keys, manifests), build.py builds them (`prepare`, the entry), and
loader.py serves batches (`TokenData`). Preparation logs progress records of kind "data.prepare" with a field `stage`
in {waiting, sampling, continuing, tokenising, wrote, reusing, rebuilding, moved}; the first five are logged with
`all_ranks=True` (every rank of a launch shows them: it waits for the lock, or it is the one building).
"""

from mhc_train.data.build import prepare
from mhc_train.data.errors import DataError, SourceMissing
from mhc_train.data.loader import TokenData
from mhc_train.data.store import find_prepared

__all__ = ["DataError", "SourceMissing", "TokenData", "find_prepared", "prepare"]
