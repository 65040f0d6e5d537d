"""Shared test helpers: external tools are required in CI and skipped loudly elsewhere."""
import os
import shutil

import pytest


def require_tool(name):
    """Return the path of a Debian tool a test needs; fail in CI if it is missing."""
    path = shutil.which(name)
    if path:
        return path
    message = "{} is not installed (run `make deps`)".format(name)
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip("SKIPPED LOUDLY: " + message)
