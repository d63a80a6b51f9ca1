"""Everything under tests/e2e/ runs train.py or a tool as a user would (subprocesses, torchrun)."""

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.e2e)
