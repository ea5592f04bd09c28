"""Parsing an XKS request path: ``/<prefix>/kms/xks/v1/(health | keys/<id>/<op>)``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from xksproxy.models import KEY_ID_RE

MAX_URI = 256  # docs/spec-notes.md §1: the whole URI is at most 256 characters
KEY_OPS = {"metadata": "metadata", "encrypt": "encrypt", "decrypt": "decrypt"}


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    api: str  # health | metadata | encrypt | decrypt
    key_id: str | None


def parse_path(path: str, bases: Mapping[str, str]) -> Route | None:
    """Match *path* (raw, without query) against *bases* (API base path -> prefix)."""
    if len(path) > MAX_URI:
        return None
    if path.endswith("/health"):
        prefix = bases.get(path[: -len("/health")])
        return None if prefix is None else Route(prefix, "health", None)
    parts = path.rsplit("/", 3)
    if len(parts) != 4 or parts[1] != "keys":
        return None
    base, _, key_id, op = parts
    prefix = bases.get(base)
    api = KEY_OPS.get(op)
    if prefix is None or api is None or not KEY_ID_RE.match(key_id):
        return None
    return Route(prefix, api, key_id)
