from mhc_train.data.errors import DataError
from mhc_train.data.loader import TokenData
from mhc_train.data.prepare import prepare

__all__ = ["DataError", "TokenData", "prepare"]
