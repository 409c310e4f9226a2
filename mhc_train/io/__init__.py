"""Cross-cutting services every layer may use. Imports nothing of mhc_train but `mhc_train.errors`.

- `log.py`: the module logger, the rank filter and structured progress records;
- `files.py`: atomic writes and fsync;
- `lock.py`: the one lock primitive (flock, with an O_EXCL marker where flock does not work) and its holder record,
  used by the run directory's lock (`mhc_train.train.lock`) and data preparation's (`mhc_train.data.lock`);
- `rundir.py`: `RunDir`, every path a run writes or reads.
"""
