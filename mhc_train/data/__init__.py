from mhc_train.data.errors import DataError, SourceMissing
from mhc_train.data.loader import TokenData
from mhc_train.data.prepare import find_prepared, prepare

__all__ = ["DataError", "SourceMissing", "TokenData", "find_prepared", "prepare"]
