"""Rank-k accuracy (RICE counting), faiss search and set-to-image search vs brute force and hand-computed cases."""
import numpy as np
import pytest

from retriever.metrics import rank_k_accuracy, rank_from_scores, search_galleries, search_sets


def test_hand_computed_cases():
    rankings = [
        ["a", "b", "c", "d"],  # gt at rank 1
        ["b", "a", "c", "d"],  # gt at rank 2
        ["d", "c", "b", "a"],  # two answers: "b" at rank 3 is the first hit
        ["x", "y"],  # gallery shorter than k, gt absent: never a hit
        ["y", "z"],  # gallery shorter than k, gt at rank 2: hit at k >= 2 (k = 3, 5 included)
        None,  # failed query: a miss everywhere, still in the denominator
    ]
    gts = [["a"], ["a"], ["b", "a"], ["q"], ["z"], ["a"]]
    r = rank_k_accuracy(rankings, gts, ks=(1, 2, 3, 5))
    assert r["hits"] == {"R1": 1, "R2": 3, "R3": 4, "R5": 4}
    assert r["R1"] == pytest.approx(1 / 6) and r["R3"] == pytest.approx(4 / 6) and r["R5"] == pytest.approx(4 / 6)
    assert r["n_queries"] == 6 and r["n_failed"] == 1


def test_empty_and_errors():
    assert rank_k_accuracy([], [], ks=(1,))["R1"] == 0.0
    with pytest.raises(ValueError):
        rank_k_accuracy([["a"]], [], ks=(1,))
    with pytest.raises(ValueError):
        rank_k_accuracy([["a"]], [["a"]], ks=(0,))


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(q, q_live, q_gt, galleries, ks):
    """Independent reference: full argsort per query, then RICE counting written out again."""
    hits = {k: 0 for k in ks}
    for i, live in enumerate(q_live):
        if live is None:
            continue
        ids, g = galleries[live]
        order = np.argsort(-(g @ q[i]))
        ranked = [ids[j] for j in order]
        for k in ks:
            hits[k] += any(x in q_gt[i] for x in ranked[:k])
    return {f"R{k}": hits[k] / len(q_live) for k in ks}


def test_faiss_search_matches_brute_force():
    rng = np.random.default_rng(0)
    d = 32
    sizes = {"L0": 40, "L1": 7, "L2": 3}  # L1/L2 shorter than k=10
    galleries = {name: ([f"{name}-{j}" for j in range(n)], _unit(rng, n, d)) for name, n in sizes.items()}
    q_live, q_gt = [], []
    for i in range(120):
        live = list(sizes)[i % 3]
        ids = galleries[live][0]
        q_live.append(None if i % 17 == 0 else live)
        q_gt.append([ids[j] for j in rng.choice(len(ids), size=1 + i % 2, replace=False)])  # 1 or 2 answers
    q = _unit(rng, 120, d)
    ks = (1, 3, 5, 10)
    ranked = search_galleries(q, q_live, galleries, k=10)
    got = rank_k_accuracy([None if r is None else r[0] for r in ranked], q_gt, ks)
    ref = _brute_force(q, q_live, q_gt, galleries, ks)
    for k in ks:
        assert got[f"R{k}"] == pytest.approx(ref[f"R{k}"])
    assert got["n_failed"] == sum(x is None for x in q_live)
    # scores come back sorted and equal to the inner products
    ids, scores = ranked[1]
    g_ids, g = galleries[q_live[1]]
    assert np.all(np.diff(scores) <= 1e-6)
    assert np.allclose(scores, [g[g_ids.index(x)] @ q[1] for x in ids], atol=1e-5)


def test_set_to_image_max_matches_brute_force():
    rng = np.random.default_rng(1)
    d = 16
    galleries = {"L": ([f"i{j}" for j in range(12)], _unit(rng, 12, d))}
    sets = [_unit(rng, n, d) for n in (1, 3, 5, 2)] + [None]
    res = search_sets(sets, ["L", "L", "L", "L", "L"], galleries, k=5)
    assert res[4] is None
    for s, r in zip(sets[:4], res[:4]):
        scores = (galleries["L"][1] @ s.T).max(1)
        ids, sc = rank_from_scores(scores, galleries["L"][0], 5)
        assert r[0] == ids
        assert np.allclose(r[1], sc, atol=1e-6)
