import numpy as np
import pytest

from stores.keys import InvalidKeyError, SampleKey, make_key, parse_key, split_of, validate_key


def test_roundtrip():
    k = make_key("train", "segment_0001", 123)
    assert k == "train/segment_0001:123"
    assert parse_key(k) == SampleKey("train", "segment_0001", 123)
    assert str(parse_key(k)) == k
    assert split_of(k) == "train"
    assert make_key("valid", "seg.a-b", np.int64(7)) == "valid/seg.a-b:7"


@pytest.mark.parametrize("bad", [
    "", "train", "train/seg", "train:1", "/seg:1", "train/:1", "train/seg:", "train/seg:-1",
    "train/seg:01", "train/seg:1.5", "train/seg:+1", "../seg:1", "train/..:1", "train/a..b:1",
    "train/a/b:1", "train\\x/seg:1", "train/se g:1", "train/.hidden:1", "train/seg:1:2", "tr ain/seg:1",
    "train/" + "s" * 200 + ":1", "train/seg:１",
])
def test_rejects_hostile(bad):
    with pytest.raises(InvalidKeyError):
        validate_key(bad)


def test_rejects_non_string_and_bad_parts():
    with pytest.raises(InvalidKeyError):
        parse_key(b"train/seg:1")  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        make_key("train", "seg", -1)
    with pytest.raises(InvalidKeyError, match="at most 18 digits"):      # parse_key would refuse it
        make_key("train", "seg", 10 ** 18)
    assert parse_key(make_key("train", "seg", 10 ** 18 - 1)).start == 10 ** 18 - 1
    with pytest.raises(InvalidKeyError):
        make_key("train", "seg", True)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        make_key("tr/ain", "seg", 0)
    with pytest.raises(InvalidKeyError, match="segment"):
        make_key("train", "", 0)
