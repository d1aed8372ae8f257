"""Whole secure-aggregation rounds: exact sums under dropouts, and every refusal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedcore.errors import SecAggError
from fedcore.secagg import (
    AdvertBundle,
    ClientPhase,
    SecAggConfig,
    SecAggServer,
    SurvivorList,
    round_params,
)
from fedcore.secagg.agreement import RoundKeys, make_advert
from fedcore.secagg.quantize import clip_l2, quantize
from tests.secagg_harness import Cohort, Dropouts, Simulation, run_round

DIM = 1000
CONFIG = SecAggConfig()


@pytest.fixture(scope="module")
def cohort30() -> Cohort:
    return Cohort.make(30)


@pytest.fixture(scope="module")
def cohort10() -> Cohort:
    return Cohort.make(10)


def _pick(names, counts, seed):
    """Disjoint dropout groups of the given sizes, chosen by a seeded shuffle."""
    order = list(np.random.default_rng(seed).permutation(names))
    groups, pos = [], 0
    for c in counts:
        groups.append(order[pos : pos + c])
        pos += c
    return groups


def _check_exact(result, run, expect_survivors):
    assert result.survivors == tuple(sorted(expect_survivors))
    exact = run.plain_quantized_sum(result.survivors)
    assert exact.max() < 2**32
    assert np.array_equal(result.int_sum.astype(np.uint64), exact)
    # and the float sum is the clipped plain sum up to one quantisation step per edge
    plain = sum(clip_l2(run.updates[e], CONFIG.clip_norm) for e in result.survivors)
    params = run.server.params
    step = 2 * params.clip_norm / (params.levels - 1)
    assert np.max(np.abs(result.float_sum - plain)) <= len(result.survivors) * step


def test_round_without_dropouts_sums_exactly(cohort10):
    result, run = run_round(cohort10, CONFIG, DIM)
    _check_exact(result, run, cohort10.names)
    assert result.dropped == ()
    assert all(c.phase is ClientPhase.DONE for c in run.clients.values())


def test_ten_percent_dropouts(cohort30):
    # 3 of 30: one after sharing keys, one after its masked input, one before unmasking
    shares, signing, unmask = _pick(cohort30.names, [1, 1, 1], seed=10)
    drop = Dropouts(masked=shares, sign=signing, unmask=unmask)
    result, run = run_round(cohort30, CONFIG, DIM, drop, seed=1)
    _check_exact(result, run, set(cohort30.names) - set(shares))
    assert result.dropped == tuple(shares)


@pytest.mark.parametrize("pick_seed", [30, 31, 32])
def test_thirty_percent_dropouts(cohort30, pick_seed):
    # 9 of 30: before advertising, after sharing keys, and after the masked input; the graph
    # is sized for 30% dropouts (every neighbourhood must keep a majority)
    config = SecAggConfig(expected_dropout=0.3)
    advert, shares, signing, unmask = _pick(cohort30.names, [1, 4, 2, 2], seed=pick_seed)
    drop = Dropouts(advert=advert, masked=shares, sign=signing, unmask=unmask)
    result, run = run_round(cohort30, config, DIM, drop, seed=2)
    _check_exact(result, run, set(cohort30.names) - set(advert) - set(shares))
    assert result.dropped == tuple(sorted(shares))


def test_thirty_percent_dropouts_all_before_the_masked_input(cohort10):
    # default sparse sizing: n = 10 gives k = 8, t = 5; 3 edges drop after sharing keys
    (shares,) = _pick(cohort10.names, [3], seed=33)
    result, run = run_round(cohort10, CONFIG, DIM, Dropouts(masked=shares), seed=3)
    assert run.server.params.neighbours == 8
    _check_exact(result, run, set(cohort10.names) - set(shares))


def test_ten_percent_dropouts_on_a_sparse_graph_at_every_stage(cohort30):
    # k = 10 of 29 possible neighbours, t = 6: any 3 dropouts leave every majority
    for pick_seed in range(3):
        shares, signing, unmask = _pick(cohort30.names, [1, 1, 1], seed=100 + pick_seed)
        drop = Dropouts(masked=shares, sign=signing, unmask=unmask)
        result, run = run_round(cohort30, CONFIG, DIM, drop, seed=pick_seed)
        assert run.server.params.neighbours == 10
        _check_exact(result, run, set(cohort30.names) - set(shares))


def test_deterministic_rounding_matches_an_independent_quantisation(cohort10):
    config = SecAggConfig(stochastic_rounding=False, clip_norm=2.0)
    (gone,) = _pick(cohort10.names, [1], seed=4)
    result, run = run_round(cohort10, config, DIM, Dropouts(masked=gone), seed=4)
    params = round_params(config, 10)
    expected = sum(quantize(run.updates[e], params).astype(np.uint64) for e in result.survivors)
    assert np.array_equal(result.int_sum.astype(np.uint64), expected)


def test_masks_never_touch_numpy_random(cohort10, monkeypatch):
    rng = np.random.default_rng(5)
    updates = {e: rng.normal(0, 0.01, DIM) for e in cohort10.names}

    def forbidden(*args, **kwargs):
        raise AssertionError("numpy.random used during secure aggregation")

    for name in [
        "default_rng",
        "Generator",
        "RandomState",
        "seed",
        "random",
        "randint",
        "rand",
        "randn",
        "normal",
        "uniform",
        "bytes",
        "PCG64",
        "MT19937",
    ]:
        monkeypatch.setattr(np.random, name, forbidden)
    result, run = run_round(cohort10, CONFIG, DIM, updates=updates)
    _check_exact(result, run, cohort10.names)


def test_masked_inputs_look_nothing_like_the_quantised_updates(cohort10):
    sim = Simulation(cohort10, SecAggConfig(stochastic_rounding=False), DIM)
    sim.to_masked_input()
    for e, msg in sim.masked.items():
        values = np.frombuffer(msg.values, dtype="<u4")
        q = sim.clients[e].quantized
        assert np.count_nonzero(values == q) < DIM // 100
        # masked values spread over the whole ring, not the quantisation range
        assert values.max() > 2**31
    # two edges with the same update send different masked inputs
    a, b = cohort10.names[:2]
    same = {**sim.updates, b: sim.updates[a]}
    again = Simulation(cohort10, SecAggConfig(stochastic_rounding=False), DIM, updates=same)
    again.to_masked_input()
    qa, qb = again.clients[a].quantized, again.clients[b].quantized
    assert qa is not None and qb is not None
    assert np.array_equal(qa, qb)
    assert again.masked[a].values != again.masked[b].values


# -- refusals on the edge: both shares, inconsistency, forged adverts ----------------------


def _tamper_unmask(victim, change):
    def hook(step, msg):
        if step == "unmask-request" and msg.recipient == victim:
            return change(msg)
        return msg

    return hook


def test_request_for_both_shares_of_one_peer_is_refused(cohort10):
    victim = cohort10.names[0]

    def both(msg):
        peer = msg.self_mask_peers[0]
        return dataclasses.replace(msg, mask_key_peers=(*msg.mask_key_peers, peer))

    with pytest.raises(SecAggError) as exc:
        run_round(cohort10, CONFIG, DIM, tamper=_tamper_unmask(victim, both))
    assert exc.value.reason == "both-shares-requested"
    assert "self-mask and the mask-key share" in str(exc.value)


def test_second_unmask_request_is_refused(cohort10):
    _, run = run_round(cohort10, CONFIG, DIM)
    edge = cohort10.names[0]
    req = run.requests[edge]
    other = dataclasses.replace(req, self_mask_peers=(), mask_key_peers=req.self_mask_peers)
    with pytest.raises(SecAggError) as exc:
        run.clients[edge].unmask(other)
    assert exc.value.reason == "wrong-phase"


def test_key_share_of_a_signed_survivor_is_refused(cohort10):
    victim = cohort10.names[1]

    def claim_dropped(msg):
        return dataclasses.replace(
            msg, self_mask_peers=msg.self_mask_peers[1:], mask_key_peers=msg.self_mask_peers[:1]
        )

    with pytest.raises(SecAggError) as exc:
        run_round(cohort10, CONFIG, DIM, tamper=_tamper_unmask(victim, claim_dropped))
    assert exc.value.reason == "inconsistent-request"


def test_request_with_another_survivor_list_or_no_signatures_is_refused(cohort10):
    victim = cohort10.names[2]
    for change, reason in [
        (lambda m: dataclasses.replace(m, survivors=m.survivors[1:]), "inconsistent-survivors"),
        (lambda m: dataclasses.replace(m, signatures=()), "inconsistent-survivors"),
    ]:
        with pytest.raises(SecAggError) as exc:
            run_round(cohort10, CONFIG, DIM, tamper=_tamper_unmask(victim, change))
        assert exc.value.reason == reason


def test_refused_edge_answers_nothing_more(cohort10):
    sim = Simulation(cohort10, CONFIG, DIM)
    requests = sim.to_unmask_requests()
    victim = cohort10.names[0]
    genuine = requests[victim]
    both = dataclasses.replace(genuine, mask_key_peers=genuine.self_mask_peers[:1])
    with pytest.raises(SecAggError, match="both-shares-requested"):
        sim.clients[victim].unmask(both)
    assert sim.clients[victim].phase is ClientPhase.FAILED
    with pytest.raises(SecAggError) as exc:
        sim.clients[victim].unmask(genuine)
    assert exc.value.reason == "wrong-phase"


def test_forged_advert_with_the_wrong_signer_is_rejected_by_the_server(cohort10):
    server = SecAggServer(CONFIG, "r", cohort10.enrolled, DIM)
    digest = server.setup.digest()
    intruder = ed25519.Ed25519PrivateKey.generate()
    forged = make_advert(intruder, RoundKeys(), "r", digest, cohort10.names[0])
    with pytest.raises(SecAggError) as exc:
        server.receive_advert(forged)
    assert (exc.value.reason, exc.value.edge) == ("bad-signature", cohort10.names[0])


def test_tampered_advert_key_is_rejected_by_the_server(cohort10):
    server = SecAggServer(CONFIG, "r", cohort10.enrolled, DIM)
    edge = cohort10.names[3]
    client = cohort10.clients(CONFIG)[edge]
    advert = client.advertise(server.setup)
    tampered = dataclasses.replace(
        advert, mask_pk=RoundKeys().masking.public_key().public_bytes_raw()
    )
    with pytest.raises(SecAggError) as exc:
        server.receive_advert(tampered)
    assert exc.value.reason == "bad-signature"
    server.receive_advert(advert)  # the genuine one still goes through


def test_advert_replayed_from_another_round_is_rejected(cohort10):
    old = SecAggServer(CONFIG, "round-1", cohort10.enrolled, DIM)
    new = SecAggServer(CONFIG, "round-1", cohort10.enrolled, DIM)  # same id, fresh seed
    edge = cohort10.names[0]
    advert = cohort10.clients(CONFIG)[edge].advertise(old.setup)
    with pytest.raises(SecAggError) as exc:
        new.receive_advert(advert)
    assert exc.value.reason == "bad-signature"


def test_edge_rejects_a_forged_advert_relayed_by_the_server(cohort10):
    victim = cohort10.names[0]

    def swap_key(step, msg):
        if step == "advert-bundle" and msg.recipient == victim:
            first = msg.adverts[0]
            forged = dataclasses.replace(
                first, cipher_pk=RoundKeys().cipher.public_key().public_bytes_raw()
            )
            return AdvertBundle(msg.round_id, msg.recipient, (forged, *msg.adverts[1:]))
        return msg

    with pytest.raises(SecAggError) as exc:
        run_round(cohort10, CONFIG, DIM, tamper=swap_key)
    assert exc.value.reason == "bad-signature"


def test_setup_with_other_settings_is_refused(cohort10):
    server = SecAggServer(SecAggConfig(threshold=0.6), "r", cohort10.enrolled, DIM)
    client = cohort10.clients(CONFIG)[cohort10.names[0]]
    with pytest.raises(SecAggError) as exc:
        client.advertise(server.setup)
    assert exc.value.reason == "config-mismatch"


# -- thresholds ---------------------------------------------------------------------------


def test_too_few_masked_inputs_fail_clearly(cohort10):
    # n = 10 needs 6 survivors: 5 drop after sharing keys
    with pytest.raises(SecAggError) as exc:
        run_round(cohort10, CONFIG, DIM, Dropouts(masked=cohort10.names[:5]))
    assert exc.value.reason == "below-threshold"
    assert "5 edges sent masked inputs, at least 6 needed" in str(exc.value)


def test_too_few_unmask_responses_fail_clearly(cohort10):
    # k = 8, t = 5: with 5 of 10 answering, some survivor has at most 4 answering neighbours
    with pytest.raises(SecAggError) as exc:
        run_round(cohort10, CONFIG, DIM, Dropouts(unmask=cohort10.names[:5]))
    assert exc.value.reason == "below-threshold"
    assert "shares" in str(exc.value)


def test_too_few_signers_fail_before_any_share_is_revealed(cohort10):
    with pytest.raises(SecAggError) as exc:
        run_round(cohort10, CONFIG, DIM, Dropouts(sign=cohort10.names[:5]))
    assert exc.value.reason == "below-threshold"


def test_edge_refuses_to_sign_a_disconnected_or_short_survivor_list(cohort30):
    config = SecAggConfig(neighbours=2)  # a ring: easy to cut in two
    sim = Simulation(cohort30, config, DIM)
    graph = sim.server.graph
    chain = [cohort30.names[0]]
    while len(chain) < 30:
        chain.append(next(v for v in graph[chain[-1]] if v not in chain))
    # 16 of 30 survivors (enough), but two arcs of the ring with no edge between them
    split = tuple(sorted(chain[:8] + chain[15:23]))
    short = tuple(sorted(chain[:8]))
    for fake, reason in [(split, "disconnected-survivors"), (short, "below-threshold")]:
        sim = Simulation(cohort30, config, DIM)
        sim.to_masked_input()
        with pytest.raises(SecAggError) as exc:
            sim.clients[chain[0]].sign_survivors(SurvivorList(sim.server.setup.round_id, fake))
        assert exc.value.reason == reason


# -- refusals on the server -----------------------------------------------------------------


def test_server_refuses_duplicates_strangers_and_bad_sizes(cohort10):
    server = SecAggServer(CONFIG, "r", cohort10.enrolled, DIM)
    clients = cohort10.clients(CONFIG)
    adverts = {e: c.advertise(server.setup) for e, c in clients.items()}
    for a in adverts.values():
        server.receive_advert(a)
    with pytest.raises(SecAggError, match="duplicate"):
        server.receive_advert(adverts[cohort10.names[0]])
    stranger = dataclasses.replace(adverts[cohort10.names[0]], edge="edge-999")
    with pytest.raises(SecAggError) as exc:
        server.receive_advert(stranger)
    assert exc.value.reason == "wrong-phase" or exc.value.reason == "unexpected-sender"
    bundles = server.close_adverts()
    for e, b in bundles.items():
        server.receive_shares(clients[e].share_keys(b))
    deliveries = server.close_shares()
    e0 = cohort10.names[0]
    masked = clients[e0].masked_input(deliveries[e0], np.zeros(DIM))
    with pytest.raises(SecAggError) as exc:
        server.receive_masked_input(dataclasses.replace(masked, values=masked.values[:-4]))
    assert exc.value.reason == "shape-mismatch"
    with pytest.raises(SecAggError) as exc:
        server.receive_masked_input(dataclasses.replace(masked, round_id="other"))
    assert exc.value.reason == "wrong-round"
    server.receive_masked_input(masked)
    with pytest.raises(SecAggError) as exc:
        server.receive_masked_input(masked)
    assert exc.value.reason == "duplicate"
