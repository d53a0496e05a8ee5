"""Shared helpers of acfrec.utils."""

from __future__ import annotations

import numpy as np

from acfrec.utils import is_int_at_least


def test_is_int_at_least_takes_integers_only():
    assert is_int_at_least(3, 1) and is_int_at_least(np.int64(3), 3) and is_int_at_least(0, 0)
    assert not is_int_at_least(0, 1) and not is_int_at_least(True, 1) and not is_int_at_least(2.0, 1)
    assert not is_int_at_least("3", 1) and not is_int_at_least(None, 0)
