"""Key allow-lists: ``[prefixes."P"] keys`` limits the external keys a prefix serves; any other
key is KeyNotFoundException to it.  Matching and bad lists here; the configuration and a real
proxy with SIGHUP: tests/integration/test_key_lists_proxy.py."""

from __future__ import annotations

from typing import Any

import pytest

from xksproxy.authz import parse_key_list


def key_list(value: Any) -> Any:
    problems: list[str] = []
    parsed = parse_key_list(value, "keys", problems)
    return parsed if parsed is not None else problems


@pytest.mark.parametrize(
    ("patterns", "key_id", "served"),
    [
        (["foo"], "foo", True),
        (["foo"], "foo2", False),
        (["foo"], "FOO", False),  # key ids are case-sensitive
        (["orders-*"], "orders-2026", True),
        (["orders-*"], "orders-", True),
        (["orders-*"], "order-1", False),
        (["k?"], "k1", True),
        (["k?"], "k12", False),
        (["a.b"], "axb", False),  # a dot is a dot
        (["*"], "anything", True),
        ([], "foo", False),  # an empty list serves no key
        (["foo", "bar-*"], "bar-1", True),
    ],
)
def test_matching(patterns: list[str], key_id: str, served: bool) -> None:
    assert (key_id in key_list(patterns)) is served


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("foo", "must be a list"),
        ({"a": 1}, "must be a list"),
        ([""], "'' is not a key id"),
        (["a/b"], "'a/b' is not a key id"),
        ([1], "1 is not a key id"),
        (["x" * 129], "is not a key id"),
    ],
)
def test_bad_lists(value: Any, problem: str) -> None:
    problems = key_list(value)
    assert isinstance(problems, list) and any(problem in p for p in problems), problems
