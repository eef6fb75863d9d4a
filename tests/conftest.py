"""Fixtures shared by the test modules."""

import pytest

from streams.broker import EmbeddedBroker


@pytest.fixture(scope="module")
def broker():
    """A real Kafka-protocol broker (embedded tansu, in memory), one per test module."""
    with EmbeddedBroker() as running:
        yield running
