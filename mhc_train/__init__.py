"""mhc-train: pretraining decoder-only LLMs with residual, HC or mHC residual streams."""

__version__ = "0.1.0"
