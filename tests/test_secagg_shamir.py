"""Shamir secret sharing over a prime field: hand-checkable values and failure modes."""

from __future__ import annotations

import itertools
import os

import pytest

from fedcore.errors import SecAggError
from fedcore.secagg import shamir
from fedcore.secagg.shamir import PRIME, Share, combine, evaluate, lagrange_at_zero, split

# The textbook example: f(x) = 1234 + 166 x + 94 x^2 over GF(1613).
SMALL_P = 1613
TEXTBOOK = [(1, 1494), (2, 329), (3, 965), (4, 176), (5, 1188), (6, 775)]


def test_prime_is_the_521_bit_mersenne_prime_and_holds_any_32_byte_secret():
    assert PRIME == 2**521 - 1
    assert PRIME > 2**256
    assert PRIME.bit_length() <= shamir.SHARE_BYTES * 8


def test_evaluate_matches_hand_computed_points():
    for x, y in TEXTBOOK:
        assert evaluate([1234, 166, 94], x, SMALL_P) == y
    # over the big field nothing wraps: 1234 + 166*3 + 94*9 = 2578
    assert evaluate([1234, 166, 94], 3) == 2578


@pytest.mark.parametrize("subset", list(itertools.combinations(TEXTBOOK, 3)))
def test_any_three_textbook_shares_give_1234(subset):
    points = [Share(x, y) for x, y in subset]
    assert lagrange_at_zero(points, SMALL_P) == 1234


def test_two_textbook_shares_give_something_else():
    # the line through (1, 1494) and (2, 329) meets x = 0 at 2*1494 - 329 = 2659 = 1046 mod 1613
    assert lagrange_at_zero([Share(1, 1494), Share(2, 329)], SMALL_P) == 1046


def test_split_and_combine_round_trip_with_any_threshold_subset():
    secret = os.urandom(32)
    xs = [3, 7, 11, 12, 20]
    shares = split(secret, xs, threshold=3)
    assert [s.x for s in shares] == xs
    for subset in itertools.combinations(shares, 3):
        assert combine(list(subset), 3) == secret
    assert combine(shares, 3) == secret


def test_threshold_minus_one_shares_are_refused_and_reveal_nothing_useful():
    secret = os.urandom(32)
    shares = split(secret, [1, 2, 3, 4], threshold=3)
    with pytest.raises(SecAggError) as exc:
        combine(shares[:2], 3)
    assert exc.value.reason == "below-threshold"
    # interpolating too few points gives an unrelated field element, not the secret
    assert lagrange_at_zero(shares[:2]) != int.from_bytes(secret, "big")


def test_a_wrong_share_gives_a_wrong_secret_not_an_exception():
    secret = os.urandom(32)
    shares = split(secret, [1, 2, 3], threshold=3)
    bad = [shares[0], shares[1], Share(3, (shares[2].y + 1) % PRIME)]
    assert lagrange_at_zero(bad) != int.from_bytes(secret, "big")


def test_share_bytes_round_trip_and_out_of_field_values_are_refused():
    (share,) = split(os.urandom(32), [5], threshold=1)
    assert shamir.share_from_bytes(5, share.y_bytes()) == share
    with pytest.raises(SecAggError) as exc:
        shamir.share_from_bytes(5, b"\xff" * shamir.SHARE_BYTES)
    assert exc.value.reason == "malformed"
    with pytest.raises(SecAggError):
        shamir.share_from_bytes(5, b"\x00" * 10)


@pytest.mark.parametrize(
    ("secret", "xs", "t"),
    [(b"short", [1, 2], 1), (bytes(32), [1, 1], 2), (bytes(32), [0, 1], 1), (bytes(32), [1], 2)],
)
def test_split_refuses_bad_arguments(secret, xs, t):
    with pytest.raises(SecAggError):
        split(secret, xs, t)


def test_duplicate_x_coordinates_are_refused_on_combine():
    with pytest.raises(SecAggError):
        lagrange_at_zero([Share(1, 5), Share(1, 6)])
