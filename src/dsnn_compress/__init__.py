"""dsnn-compress: nested sparsity levels for ASR models in one safetensors bundle."""

__version__ = "0.1.0"


def tool_metadata() -> dict[str, str]:
    """The ``tool`` record every file and report this package writes carries: name and version."""
    return {"name": "dsnn-compress", "version": __version__}
