"""dsnn-compress: nested sparsity levels for ASR models in one safetensors bundle."""

__version__ = "0.1.0"
