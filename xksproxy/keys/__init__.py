"""Key lifecycle, run by the command line against the HSMs (never on the request path).

By job: :mod:`~xksproxy.keys.sessions` (a command's session on each HSM),
:mod:`~xksproxy.keys.store` (one token's key objects, and :class:`~xksproxy.keys.store.KeyCopy`,
one HSM's copy of a key), :mod:`~xksproxy.keys.create` (a key or version on every HSM),
:mod:`~xksproxy.keys.versions` (rotation, show, repair), :mod:`~xksproxy.keys.fleet` (list and
state on every HSM), :mod:`~xksproxy.keys.deletion`, :mod:`~xksproxy.keys.replicate` with
:mod:`~xksproxy.keys.replicate_plan`, and bring-your-own-key in :mod:`~xksproxy.keys.byok` with
its wrapping and import-token modules.
"""
