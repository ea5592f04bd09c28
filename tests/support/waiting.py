"""Waiting for something, bounded: a broken proxy fails a test, never hangs it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path


def until(cond: Callable[[], object], what: str, timeout: float = 30) -> float:
    """Poll *cond* until it is true; how long it took.  AssertionError naming *what* after
    *timeout* seconds."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() < start + timeout, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def until_in(path: Path, needle: str, timeout: float = 30) -> None:
    """Wait until the text of *path* holds *needle* (a proxy's log: '"listening"')."""
    until(lambda: path.exists() and needle in path.read_text(errors="replace"), needle, timeout)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> float:
    """Poll *cond*; how long it took.  AssertionError naming *what* after *timeout* seconds."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


async def wait_until(cond: object, timeout: float = 5.0) -> None:
    """Yield to the event loop until *cond()* is true; AssertionError after *timeout* s."""
    end = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < end, "condition not reached"
        await asyncio.sleep(0.005)
