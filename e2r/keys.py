"""The sample key grammar, re-exported for users of ``e2r.keys``: it lives in `stores.keys` (the grammar is
the store's index)."""
from stores.keys import (MAX_KEY_LEN, InvalidKeyError, SampleKey, make_key, parse_key, split_of, validate_key,
                         validate_part)

__all__ = ["InvalidKeyError", "SampleKey", "make_key", "parse_key", "validate_key", "validate_part", "split_of",
           "MAX_KEY_LEN"]
