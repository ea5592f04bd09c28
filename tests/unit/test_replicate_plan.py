"""What ``keys replicate`` plans to do for one key (xksproxy/keys/replicate_plan.py), as a
table: the copies on the source and the target in, the plan out.  The command on real HSMs:
tests/integration/test_replicate.py."""

from __future__ import annotations

from typing import Any

import pytest

from xksproxy.hsm import objects
from xksproxy.keys.replicate_plan import KeyObjects, VersionObject, plan_copy

# --- the rules, as a table ----------------------------------------------------------------


def _copy(
    kcvs: dict[int, str | None],
    meta: objects.KeyMeta | None = None,
    extractable: bool = True,
    dec: bool = True,
) -> KeyObjects:
    return KeyObjects(
        {v: VersionObject(None, k, True, dec, extractable) for v, k in kcvs.items()}, meta
    )


DISABLED = objects.KeyMeta(status="DISABLED", revision=3)
RECORD = objects.VersionMeta(objects.parse_time("2024-01-02T03:04:05Z"), "generated")
REFUSE = "refusing to overwrite a different copy of 'k' on B: "
STATE = (
    "the state of 'k' differs (status ENABLED on A, DISABLED on B): not changed on B; settle "
    "it with the key commands (keys enable, keys disable, ...), which act on every HSM"
)


@pytest.mark.parametrize(
    ("src", "dst", "expected"),
    [
        (_copy({1: "E:aaaaaa"}), _copy({1: "E:aaaaaa"}), {"idle": True, "alike": (1,)}),
        (_copy({1: "E:aaaaaa", 2: "E:cccccc"}), _copy({}), {"missing": (1, 2), "new_meta": None}),
        (_copy({1: "E:aaaaaa"}, DISABLED), _copy({}), {"missing": (1,), "new_meta": DISABLED}),
        # Metadata without key versions (a crash) is replaced by the source's.
        (_copy({1: "E:aaaaaa"}), _copy({}, DISABLED), {"new_meta": objects.KeyMeta()}),
        # A target with versions but no metadata takes the source's.
        (_copy({1: "E:aaaaaa"}, DISABLED), _copy({1: "E:aaaaaa"}), {"new_meta": DISABLED}),
        (
            _copy({1: "E:aaaaaa"}, objects.KeyMeta(versions={1: RECORD})),
            _copy({1: "E:aaaaaa"}, objects.KeyMeta(revision=4)),
            {"records": {1: RECORD}, "new_meta": None, "problems": ()},
        ),
        (
            _copy({1: "E:aaaaaa"}),
            _copy({1: "E:aaaaaa"}, DISABLED),
            {"problems": (STATE,), "idle": True},
        ),
        (
            _copy({1: "E:aaaaaa"}),
            _copy({1: "E:bbbbbb"}),
            {"refusal": REFUSE + "version 1 KCV E:aaaaaa on A, E:bbbbbb on B"},
        ),
        (
            _copy({1: "E:aaaaaa"}),
            _copy({1: "D:aaaaaa"}),
            {"refusal": REFUSE + "version 1 KCV E:aaaaaa on A, D:aaaaaa on B"},
        ),
        (
            _copy({1: "E:aaaaaa"}),
            _copy({1: "E:aaaaaa", 2: "E:cccccc"}),
            {"refusal": REFUSE + "it has version 2, which A lacks"},
        ),
        (_copy({1: "E:aaaaaa"}, extractable=False), _copy({1: "E:aaaaaa"}), {"idle": True}),
        # The same material allowed less: not a different copy, but a problem to settle.
        (
            _copy({1: "E:aaaaaa"}),
            _copy({1: "E:aaaaaa"}, dec=False),
            {
                "problems": (
                    "the usage of 'k' differs (encrypt,decrypt on A, encrypt on B): "
                    "not changed on B",
                ),
                "idle": True,
            },
        ),
        (_copy({1: None}), _copy({}), {"missing": (1,), "unverified": (1,)}),
        (_copy({1: None}), _copy({1: None}), {"idle": True, "unverified": (1,)}),
    ],
)
def test_plan_copy(src: KeyObjects, dst: KeyObjects, expected: dict[str, Any]) -> None:
    plan = plan_copy("k", "A", "B", src, dst)
    got = {name: getattr(plan, name) for name in expected}
    assert got == expected


def test_plan_copy_refuses_a_version_that_cannot_leave_the_source() -> None:
    plan = plan_copy("k", "A", "B", _copy({1: "E:aaaaaa"}, extractable=False), _copy({}))
    assert plan.refusal is not None
    assert plan.refusal.startswith("'k' cannot be copied: version 1 on A is not extractable")


def test_plan_copy_refuses_unreadable_metadata_on_the_source() -> None:
    unreadable = objects.KeyMeta.from_bytes(b"not json")
    plan = plan_copy("k", "A", "B", _copy({1: "E:aaaaaa"}, unreadable), _copy({}))
    assert plan.refusal is not None
    assert "metadata of 'k' on A is unreadable" in plan.refusal
