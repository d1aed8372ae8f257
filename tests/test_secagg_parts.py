"""The building blocks: masks (AES-CTR, not numpy), graph, quantisation, config, codec."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcore.errors import ConfigError, SecAggError
from fedcore.secagg import SecAggConfig, check_compatible, round_params
from fedcore.secagg.codec import Reader, Writer
from fedcore.secagg.config import (
    ROUND_FAILURE_TARGET,
    failure_bound,
    max_quant_bits,
    neighbours_for,
)
from fedcore.secagg.graph import build_graph, is_connected
from fedcore.secagg.messages import KeyAdvert, MaskedInput, RoundSetup
from fedcore.secagg.prg import add_mask, derive_key, mask
from fedcore.secagg.quantize import clip_l2, dequantize_sum, quantize

# -- masks -------------------------------------------------------------------------------


def test_mask_is_the_aes256_ctr_keystream_of_an_hkdf_key():
    seed = bytes(range(32))
    key = derive_key(seed, "self-mask", b"digest", "edge-1")
    info = Writer().text("fedgate/secagg/v1").text("self-mask").blob(b"digest").text("edge-1")
    expected_key = HKDF(hashes.SHA256(), 32, salt=None, info=info.finish()).derive(seed)
    assert key == expected_key
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4000))
    assert mask(key, 1000).tobytes() == stream
    assert np.array_equal(mask(key, 1000), np.frombuffer(stream, dtype="<u4"))


def test_mask_keys_are_separated_by_purpose_and_context():
    seed = bytes(32)
    keys = {
        derive_key(seed, "self-mask", b"d", "a"),
        derive_key(seed, "pair-mask", b"d", "a"),
        derive_key(seed, "self-mask", b"d", "b"),
        derive_key(seed, "self-mask", b"e", "a"),
    }
    assert len(keys) == 4


def test_masks_look_uniform_and_add_mask_wraps_modulo_2_32():
    values = mask(derive_key(b"x" * 32, "test"), 200_000).astype(np.float64)
    assert abs(values.mean() / 2**32 - 0.5) < 0.01
    acc = np.full(5, 2**32 - 1, dtype=np.uint32)
    scratch = np.empty_like(acc)
    key = derive_key(b"y" * 32, "test")
    add_mask(acc, key, 1, scratch)
    add_mask(acc, key, -1, scratch)
    assert np.all(acc == 2**32 - 1)


# -- graph -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 50, 100, 300])
def test_graph_is_symmetric_regular_with_about_2_log2_n_neighbours(n):
    names = [f"e{i}" for i in range(n)]
    k = round_params(SecAggConfig(), n).neighbours
    assert k == min(n - 1, 2 * math.ceil(math.log2(n)))
    graph = build_graph(names, b"s" * 32, k)
    assert set(graph) == set(names)
    for u, near in graph.items():
        assert len(near) == k and u not in near
        assert all(u in graph[v] for v in near)
    assert is_connected(names, graph)


def test_graph_is_deterministic_from_the_seed_and_changes_with_it():
    names = [f"e{i}" for i in range(50)]
    a = build_graph(names, b"a" * 32, 12)
    assert a == build_graph(list(reversed(names)), b"a" * 32, 12)
    assert a != build_graph(names, b"b" * 32, 12)


def test_small_cohorts_get_a_complete_graph():
    graph = build_graph(["a", "b", "c", "d"], b"s" * 32, 6)
    assert graph["a"] == ("b", "c", "d")


def test_is_connected_sees_a_split():
    graph = {"a": ("b",), "b": ("a",), "c": ("d",), "d": ("c",)}
    assert is_connected(["a", "b"], graph)
    assert not is_connected(["a", "b", "c", "d"], graph)
    assert not is_connected([], graph)


# -- quantisation ------------------------------------------------------------------------


def test_quant_bits_never_overflow_the_cohort_sum():
    for n in [3, 10, 50, 100, 1000, 10**6]:
        bits = max_quant_bits(n)
        assert n * (2**bits - 1) < 2**32
        assert n * (2 ** (bits + 1) - 1) >= 2**32
    assert round_params(SecAggConfig(), 100).quant_bits == 25


def test_explicit_quant_bits_that_would_overflow_are_refused():
    with pytest.raises(ConfigError, match="overflows"):
        round_params(SecAggConfig(quant_bits=31), 10)


def test_worst_case_sum_of_every_participant_fits():
    params = round_params(SecAggConfig(clip_norm=1.0, stochastic_rounding=False), 50)
    top = quantize(np.array([1.0, 0.0, 0.0]), params)
    assert int(top[0]) == params.levels - 1
    assert 50 * int(top[0]) < 2**32


def test_clip_scales_long_updates_to_the_bound():
    x = clip_l2(np.array([3.0, 4.0]), 1.0)
    assert np.allclose(x, [0.6, 0.8])
    assert np.array_equal(clip_l2(np.array([0.3, 0.4]), 1.0), [0.3, 0.4])


def test_non_finite_updates_are_refused():
    with pytest.raises(SecAggError) as exc:
        clip_l2(np.array([1.0, np.nan]), 1.0)
    assert exc.value.reason == "non-finite"


def test_deterministic_quantisation_hand_values():
    # 3 bits over [-1, 1]: scale 7/2; -1 -> 0, 0 -> 3.5 -> 4 (rint to even), 0.5 -> 5.25 -> 5
    params = round_params(SecAggConfig(quant_bits=3, stochastic_rounding=False), 3)
    q = quantize(np.array([-0.5, 0.0, 0.5]) / 1.0, params)
    assert q.tolist() == [2, 4, 5]
    total = dequantize_sum(q, 1, params)
    assert np.allclose(total, [2 / 3.5 - 1, 4 / 3.5 - 1, 5 / 3.5 - 1])


def test_stochastic_rounding_is_unbiased():
    params = round_params(SecAggConfig(quant_bits=4), 3)
    x = np.full(100_000, 0.00123)  # L2 norm 0.39: not clipped
    q = quantize(x, params)
    est = dequantize_sum(q, 1, params)
    step = 2.0 / (params.levels - 1)
    assert abs(est.mean() - 0.00123) < step / 50
    assert set(np.unique(q).tolist()) == {7, 8}  # 1.00123 * 7.5 = 7.509


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0.4},
        {"threshold": 1.0},
        {"clip_norm": 0.0},
        {"clip_norm": math.inf},
        {"neighbours": 3},
        {"neighbours": 0},
        {"quant_bits": 32},
        {"quant_bits": 0},
    ],
)
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ConfigError):
        SecAggConfig(**kwargs)


def test_too_small_cohort_is_refused():
    with pytest.raises(ConfigError, match="at least 3"):
        round_params(SecAggConfig(), 2)


@pytest.mark.parametrize("strategy", ["FedAvg", "fedprox", "FedAdam", " FedYogi ", "FedAvgM"])
def test_sum_strategies_are_compatible(strategy):
    check_compatible(strategy, trainer_clip=False)


@pytest.mark.parametrize(
    ("strategy", "needle"),
    [
        ("median", "median needs every individual update"),
        ("Trimmed-Mean", "trimmed mean sorts individual updates"),
        ("trimmed_mean", "trimmed mean"),
        ("krum", "Krum"),
        ("bulyan", "Bulyan"),
    ],
)
def test_robust_strategies_are_refused_with_a_reason(strategy, needle):
    with pytest.raises(ConfigError, match=needle) as exc:
        check_compatible(strategy, trainer_clip=False)
    assert "only ever sees the sum" in str(exc.value)


def test_trainer_side_clipping_is_refused():
    with pytest.raises(ConfigError, match="trainer-side clipping of individual updates"):
        check_compatible("fedavg", trainer_clip=True)


def test_unknown_strategy_is_refused():
    with pytest.raises(ConfigError, match="does not know strategy"):
        check_compatible("mystery", trainer_clip=False)


# -- codec -------------------------------------------------------------------------------


def test_setup_round_trips_and_its_digest_covers_every_field():
    setup = RoundSetup("r1", b"s" * 32, ("a", "b", "c"), 10, SecAggConfig(neighbours=4))
    assert RoundSetup.from_bytes(setup.to_bytes()) == setup
    other = RoundSetup("r1", b"s" * 32, ("a", "b", "c"), 10, SecAggConfig(neighbours=6))
    assert setup.digest() != other.digest()


def test_truncated_trailing_and_foreign_bytes_are_malformed():
    data = MaskedInput("r", "e", b"\x01\x02\x03\x04").to_bytes()
    for bad in [data[:-1], data + b"\x00", b"XXXX" + data[4:], data[:5] + b"\x09" + data[6:]]:
        with pytest.raises(SecAggError) as exc:
            MaskedInput.from_bytes(bad)
        assert exc.value.reason == "malformed"
    with pytest.raises(SecAggError):
        KeyAdvert.from_bytes(data)


def test_reader_refuses_counts_larger_than_the_data():
    data = Writer().count(10**6).finish()
    with pytest.raises(SecAggError, match="exceeds"):
        Reader(data, "x").texts()


def test_fixed_size_fields_are_checked():
    advert = KeyAdvert("r", "e", b"k" * 32, b"m" * 32, b"c" * 32, b"s" * 64)
    assert KeyAdvert.from_bytes(advert.to_bytes()) == advert
    short = KeyAdvert("r", "e", b"k" * 31, b"m" * 32, b"c" * 32, b"s" * 64)
    with pytest.raises(SecAggError, match="cipher key must be 32 bytes"):
        KeyAdvert.from_bytes(short.to_bytes())


def test_graph_sizing_for_expected_dropout():
    # default: 2 ceil(log2 n)
    assert neighbours_for(100, 0.5, None) == 14
    # k = 14, t = 8: a round fails if 7 of someone's 14 neighbours drop
    assert 0.01 < failure_bound(100, 14, 0.5, 0.1) < 0.03
    k = neighbours_for(100, 0.5, 0.1)
    assert k == 20 and failure_bound(100, k, 0.5, 0.1) <= ROUND_FAILURE_TARGET
    assert round_params(SecAggConfig(expected_dropout=0.1), 100).neighbours == 20
    # 30% at n = 100 needs (almost) everyone as a neighbour
    assert round_params(SecAggConfig(expected_dropout=0.3), 100).neighbours == 99
    with pytest.raises(ConfigError, match="not both"):
        SecAggConfig(neighbours=10, expected_dropout=0.1)
    with pytest.raises(ConfigError):
        SecAggConfig(expected_dropout=0.5)


def test_setup_flags_are_canonical():
    setup = RoundSetup("r", b"s" * 32, ("a", "b", "c"), 4, SecAggConfig(expected_dropout=0.2))
    data = setup.to_bytes()
    assert RoundSetup.from_bytes(data) == setup
    for bad in [data[:-9] + b"\x02" + data[-8:], data[:-9] + b"\x00" + data[-8:]]:
        with pytest.raises(SecAggError) as exc:
            RoundSetup.from_bytes(bad)
        assert exc.value.reason == "malformed"
