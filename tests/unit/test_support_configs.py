"""The tests' own configuration writer (tests/support/toml_writer.py, tests/support/configs.py):
what it writes reads back, with tomllib, as the data it was given; settings merge as the rig
factory relies on."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.configs import edit_config, merge, read_config, write_config
from tests.support.toml_writer import dumps

KEYS = st.text(min_size=1, max_size=12)
SCALARS = (
    st.text(max_size=20)
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
)
VALUES = st.recursive(
    SCALARS | st.lists(SCALARS, max_size=4),
    lambda inner: (
        st.dictionaries(KEYS, inner, max_size=4)
        | st.lists(st.dictionaries(KEYS, inner, max_size=3), min_size=1, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=5))
def test_what_is_written_reads_back_as_the_same_data(data: dict[str, Any]) -> None:
    assert tomllib.loads(dumps(data)) == data


def test_a_rig_configuration_is_written_as_tables() -> None:
    data = {
        "server": {"port": 1, "tls": {"cert_file": "c.pem"}},
        "hsms": [{"name": "a", "env": {"SOFTHSM2_CONF": "a.conf"}}, {"name": "b"}],
        "prefixes": {"example/xks": {"keys": ["foo", "orders-*"]}, "off": {"enabled": False}},
    }
    text = dumps(data)
    assert "[server]\nport = 1\n\n[server.tls]\n" in text
    assert '[[hsms]]\nname = "a"\n\n[hsms.env]\nSOFTHSM2_CONF = "a.conf"\n\n[[hsms]]\n' in text
    assert '[prefixes."example/xks"]\nkeys = ["foo", "orders-*"]\n' in text
    assert "[prefixes.off]\nenabled = false\n" in text
    assert tomllib.loads(text) == data


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ('a"b\\c\n\t\x7f\x00é', '"a\\"b\\\\c\\n\\t\\u007f\\u0000é"'),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (0.5, "0.5"),
        (True, "true"),
        ([1, "x", [2.5]], '[1, "x", [2.5]]'),
    ],
)
def test_values(value: Any, written: str) -> None:
    assert dumps({"v": value}) == f"v = {written}\n"
    assert tomllib.loads(dumps({"v": value})) == {"v": value}


def test_values_toml_cannot_hold_are_refused() -> None:
    with pytest.raises(TypeError):
        dumps({"v": None})
    with pytest.raises(TypeError):
        dumps({"v": b"bytes"})


def test_merge_goes_into_tables_and_every_table_of_an_array() -> None:
    data: dict[str, Any] = {
        "server": {"port": 1, "host": "127.0.0.1"},
        "hsms": [{"name": "a", "env": {"X": "1"}}, {"name": "b", "env": {}}],
        "logging": {"level": "info"},
    }
    merge(
        data,
        {
            "server": {"workers": 2, "tls": {"cert_file": "c"}},
            "hsms": {"pool_size": 2, "env": {"Y": "2"}},
            "logging": None,
            "metrics": {"port": 9},
        },
    )
    assert data == {
        "server": {"port": 1, "host": "127.0.0.1", "workers": 2, "tls": {"cert_file": "c"}},
        "hsms": [
            {"name": "a", "env": {"X": "1", "Y": "2"}, "pool_size": 2},
            {"name": "b", "env": {"Y": "2"}, "pool_size": 2},
        ],
        "metrics": {"port": 9},
    }


def test_edit_config_writes_beside_or_in_place(tmp_path: Path) -> None:
    path = write_config(tmp_path / "a.toml", {"server": {"port": 1}})
    other = edit_config(path, {"server": {"workers": 1}}, to=tmp_path / "b.toml")
    assert read_config(path) == {"server": {"port": 1}}
    assert read_config(other) == {"server": {"port": 1, "workers": 1}}
    edit_config(path, change=lambda data: data["server"].pop("port"))
    assert read_config(path) == {"server": {}}
