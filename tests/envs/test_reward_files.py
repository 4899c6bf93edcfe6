"""Harbor's reward-file rules as pure functions: what counts as a reward, what is an error."""

from __future__ import annotations

import pytest

from envs.errors import GradingError
from envs.harbor.grader import parse_reward_json, parse_reward_text, scalar_reward


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"1", 1.0), (b"0\n", 0.0), (b"  0.25 \n", 0.25), (b"-3", -3.0), (b"1e-3", 0.001)],
)
def test_reward_txt_is_one_float(data, expected):
    assert parse_reward_text(data) == {"reward": expected}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "empty"),
        (b"\n", "not a number"),
        (b"1 2", "not a number"),
        (b"pass", "not a number"),
        (b"\xff\xfe", "not a number"),
        (b"nan", "non-finite"),
        (b"inf", "non-finite"),
        (b"-Infinity", "non-finite"),
    ],
)
def test_bad_reward_txt_is_an_error(data, problem):
    with pytest.raises(ValueError, match=problem):
        parse_reward_text(data)


def test_reward_json_is_an_object_of_finite_numbers():
    assert parse_reward_json(b'{"reward": 1, "style": 0.5}') == {"reward": 1.0, "style": 0.5}
    assert parse_reward_json(b'{"passed": true}') == {"passed": 1.0}  # bool is an int in Harbor


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "empty"),
        (b"{", "not valid JSON"),
        (b"1.0", "expected a JSON object"),
        (b"[1]", "expected a JSON object"),
        (b'{"reward": "1"}', "non-numeric reward 'reward'"),
        (b'{"reward": null}', "non-numeric"),
        (b'{"reward": NaN}', "non-finite"),
        (b'{"reward": Infinity}', "non-finite"),
        (b'{"reward": 1e309}', "non-finite"),
    ],
)
def test_bad_reward_json_is_an_error(data, problem):
    with pytest.raises(ValueError, match=problem):
        parse_reward_json(data)


def test_scalar_reward_prefers_the_reward_key_then_the_only_value_then_the_mean():
    assert scalar_reward({"reward": 0.2, "other": 1.0}) == 0.2
    assert scalar_reward({"accuracy": 0.75}) == 0.75
    assert scalar_reward({"a": 1.0, "b": 0.0}) == 0.5
    with pytest.raises(GradingError, match="empty object"):
        scalar_reward({}, task="demo")
