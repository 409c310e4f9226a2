class InferenceError(RuntimeError):
    """A checkpoint, tokenizer, prompt or task cannot be used for inference; the message names it and the fix."""
