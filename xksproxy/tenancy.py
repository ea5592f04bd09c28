"""Tenancy: the URI path prefixes this proxy serves (each an external key store in KMS), and for
each its SigV4 credentials, whether it is enabled, its key list and its policy.

Built from the configuration and the credentials file at start and on every reload, and replaced
as a whole (the handler reads the one in force through a callable).  The request handler and
``xksproxy policy test`` ask :meth:`Tenancy.admission` the same question.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from xksproxy.authz import Admission, KeyList, Policy
from xksproxy.config import Config, api_base
from xksproxy.credentials import load_credentials
from xksproxy.errors import ConfigError

log = structlog.get_logger("xksproxy")


@dataclass(frozen=True)
class Tenancy:
    """What the handler knows of prefixes now; replaced as a whole on reload."""

    bases: Mapping[str, str]  # API base path -> prefix
    credentials: Mapping[str, Mapping[str, str]]  # prefix -> access key id -> secret
    enabled: Mapping[str, bool]  # prefix -> enabled
    policies: Mapping[str, Policy] = field(default_factory=dict)  # prefix -> its policy, if any
    key_lists: Mapping[str, KeyList] = field(default_factory=dict)  # prefix -> keys it serves

    def admission(self, prefix: str) -> Admission:
        """The prefix's admission rule: its key list, then its policy."""
        return Admission(self.key_lists.get(prefix), self.policies.get(prefix))

    def is_enabled(self, prefix: str) -> bool:
        return self.enabled.get(prefix, True)

    @property
    def credential_count(self) -> int:
        return sum(len(keys) for keys in self.credentials.values())

    def summary(self) -> dict[str, Any]:
        """What a reload's audit line records of the tenancy it applied (no secret)."""
        return {
            "prefixes": sorted(self.credentials),
            "credentials": self.credential_count,
            "policies": {p: f"{pol.source} ({pol.mode})" for p, pol in self.policies.items()},
            "key_lists": {p: list(keys.patterns) for p, keys in self.key_lists.items()},
        }


def build_tenancy(config: Config) -> Tenancy:
    """Prefixes, their credentials and their state, from the config and credentials file."""
    creds = load_credentials(config.sigv4.credentials_file)
    prefixes = set(creds) | set(config.prefixes)
    for prefix in sorted(set(config.prefixes) - set(creds)):
        log.warning("prefix_without_credentials", prefix=prefix)
    return Tenancy(
        bases={api_base(p): p for p in prefixes},
        credentials={p: {c.access_key_id: c.secret for c in creds.get(p, ())} for p in prefixes},
        enabled={p: config.prefix(p).enabled for p in prefixes},
        policies={p: policy for p in prefixes if (policy := config.prefix(p).policy) is not None},
        key_lists={p: keys for p in prefixes if (keys := config.prefix(p).keys) is not None},
    )


def admission_in(config: Config, prefix: str) -> Admission:
    """A configured prefix's admission rule, as the proxy would build it from *config*
    (``xksproxy policy test``), without reading the credentials file."""
    settings = config.prefix(prefix)
    return Admission(settings.keys, settings.policy)


def check_credentials_kept(config: Config, old: Tenancy, new: Tenancy) -> None:
    """ConfigError if a reload would take every credential away: a credentials file gone
    missing (a failed deploy, a mistyped path) would otherwise be applied as "no prefixes",
    every request then 404, health included.  Allowed with sigv4.allow_no_credentials."""
    path = config.sigv4.credentials_file
    if config.sigv4.allow_no_credentials or not old.credential_count:
        return
    if not path.exists():
        raise ConfigError(
            [
                f"sigv4.credentials_file: {path} does not exist; the credentials in force are"
                " kept (set sigv4.allow_no_credentials = true to serve without any)"
            ]
        )
    if not new.credential_count:
        raise ConfigError(
            [
                f"sigv4.credentials_file: {path} holds no credential; the credentials in force"
                " are kept (set sigv4.allow_no_credentials = true to serve without any)"
            ]
        )
