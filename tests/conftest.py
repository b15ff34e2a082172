"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import random_state_dict, single_torch_thread, write_checkpoint

# The tiny trained ASR model and its bundle: registered once here, so the session builds them once for every module.
pytest_plugins = ["asr_fixtures"]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module: tiny models run faster so, and tests do not fight over shared cores.

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")`` (the one definition: a session-scoped
    fixture uses ``helpers.single_torch_thread()`` instead).
    """
    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def dense_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only dense checkpoint of ``helpers.random_state_dict(0)``, shared by the session's tests."""
    return write_checkpoint(tmp_path_factory.mktemp("dense") / "dense.safetensors", random_state_dict(0))
