class DataError(RuntimeError):
    """Input data, shards, manifest or tokenizer are missing or inconsistent; the message names the fix."""
