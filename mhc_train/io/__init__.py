"""Cross-cutting services every layer may use: the module logger, atomic writes and fsync, lock records, the run
directory. Imports nothing of mhc_train but `mhc_train.errors`."""
