"""rank_pattern / alpha_pattern: ``default_and_pattern`` writes per-module values as a default
and patterns, which ``pattern_value`` (peft's matching rule) and peft's own get_pattern_key read
back as the same values."""

from __future__ import annotations

import pytest

from minipeft.config import default_and_pattern, pattern_value

peft_other = pytest.importorskip("peft.utils.other")


@pytest.mark.parametrize("values, expected", [
    ({"a.fc1": 4, "a.fc2": 4, "b.fc1": 8}, (4, {r"b\.fc1": 8})),
    # escaped: "a.b" as a regex would match "a_b" too
    ({"a.b": 2, "a_b": 4, "c": 4}, (4, {r"a\.b": 2})),
    # "fc1" alone would also match "block.fc1", and "x.fc1" would match "y.x.fc1": both anchored
    ({"fc1": 2, "block.fc1": 6, "block.fc2": 6, "x.fc1": 3, "y.x.fc1": 6},
     (6, {"^fc1$": 2, r"^x\.fc1$": 3})),
    ({"only": 5}, (5, {})),
])
def test_each_module_reads_back_its_value(values, expected):
    default, pattern = default_and_pattern(values)
    assert (default, pattern) == expected
    for key, value in values.items():
        assert pattern_value(pattern, key, default) == value
        matched = peft_other.get_pattern_key(list(pattern), key)
        assert pattern.get(matched, default) == value  # (peft returns the key itself where nothing matches)


def test_no_module_is_an_error():
    with pytest.raises(ValueError, match="no module to give a value to"):
        default_and_pattern({})
