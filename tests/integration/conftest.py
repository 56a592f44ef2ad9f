"""Fixtures shared by the integration modules."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def pyzmq_gc():
    """pyzmq's gc thread and its fds exist before any leak check (see nh.start_pyzmq_gc)."""
    nh.start_pyzmq_gc()


@pytest.fixture(scope="module")
def digits_plan(tmp_path_factory):
    """digits_cnn, robust, over 4 devices (made once per session by nh.make_plan)."""
    return nh.make_plan(tmp_path_factory, "digits_cnn", 4, "robust")
