import pytest

from kvpool.errors import InvalidArgument, ResourceExhausted
from services.store.keys import KEY_RULE, MAX_KEY_CHARS, check_key, check_keys


@pytest.mark.parametrize(
    "key", ["a", "kvpool:blk:" + "ab" * 32, "kvpool:sess:user-1_x.2", "k" * MAX_KEY_CHARS]
)
def test_accepts_keys_of_the_documented_alphabet(key):
    check_key(key)


@pytest.mark.parametrize(
    "key",
    ["", "k" * (MAX_KEY_CHARS + 1), "has space", "slash/key", "naïve", "new\nline", "star*"],
)
def test_rejects_other_keys_stating_the_rule(key):
    with pytest.raises(InvalidArgument) as err:
        check_key(key)
    assert KEY_RULE in str(err.value)
    assert "1 to 200 characters" in str(err.value)


def test_long_bad_keys_are_shortened_in_the_message():
    with pytest.raises(InvalidArgument) as err:
        check_key("x" * 500)
    assert len(str(err.value)) < 200


def test_request_key_count_is_bounded_and_names_the_limit():
    check_keys(["a"] * 3, max_keys=3)
    with pytest.raises(ResourceExhausted, match="the limit is 3"):
        check_keys(["a"] * 4, max_keys=3)
