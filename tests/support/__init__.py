"""Helpers the test modules share: test modules and conftest.py files import from here, never
from one another (docs/testing.md lists what each module holds)."""
