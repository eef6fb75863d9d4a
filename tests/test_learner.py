import numpy as np
import pytest

from engine.learner import OnlineLogisticRegression


def stream(n=400, width=6, dim=60, seed=0):
    rng = np.random.default_rng(seed)
    true_w = rng.normal(size=dim)
    indices = np.array([rng.choice(dim, size=width, replace=False) for _ in range(n)])
    values = np.full(indices.shape, 1 / np.sqrt(width))
    p = 1 / (1 + np.exp(-(true_w[indices] * values).sum(axis=1) * 3))
    return indices, values, (rng.random(n) < p).astype(int)


def sorted_coefficients(model):
    keys, weights = model.coefficients()
    order = np.argsort(keys)
    return keys[order], weights[order]


def test_batch_of_one_is_rivers_own_adagrad_update():
    """The fast path keeps river's state: with batches of one it is river's learn_one."""
    indices, values, y = stream()
    a = OnlineLogisticRegression(lr=0.1, l2=0.01)
    b = OnlineLogisticRegression(lr=0.1, l2=0.01)
    for i in range(len(y)):
        a.learn_one(dict(zip(indices[i].tolist(), values[i].tolist())), y[i])
        b.learn_many(indices[i : i + 1], values[i : i + 1], y[i : i + 1])
    ka, wa = sorted_coefficients(a)
    kb, wb = sorted_coefficients(b)
    assert np.array_equal(ka, kb)
    np.testing.assert_allclose(wa, wb, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        [a.model.optimizer.g2[k] for k in ka.tolist()],
        [b.model.optimizer.g2[k] for k in kb.tolist()],
        atol=1e-12,
    )
    x = dict(zip(indices[0].tolist(), values[0].tolist()))
    assert a.predict_proba_one(x) == pytest.approx(b.predict_proba_one(x), abs=1e-12)


@pytest.mark.parametrize("optimizer", ["adagrad", "ftrl"])
def test_mini_batches_learn(optimizer):
    indices, values, y = stream(n=3000)
    model = OnlineLogisticRegression(optimizer=optimizer, lr=0.3, ftrl_alpha=0.3, l1=0.0)
    first = model.learn_many(indices[:500], values[:500], y[:500])
    for start in range(500, 3000, 32):
        model.learn_many(
            indices[start : start + 32], values[start : start + 32], y[start : start + 32]
        )
    later = model.predict_proba_many(indices[:500], values[:500])
    loss = lambda p: -np.mean(y[:500] * np.log(p) + (1 - y[:500]) * np.log(1 - p))  # noqa: E731
    assert loss(later) < loss(first) - 0.05


def test_ftrl_weights_follow_rivers_optimizer_state():
    indices, values, y = stream(n=500)
    model = OnlineLogisticRegression(optimizer="ftrl", ftrl_alpha=0.2, l1=0.5, l2=0.1)
    for start in range(0, 500, 50):
        model.learn_many(
            indices[start : start + 50], values[start : start + 50], y[start : start + 50]
        )
    opt = model.model.optimizer
    touched = np.flatnonzero(opt.n.array)
    weights = model.model._weights.array[touched]
    np.testing.assert_allclose(
        weights, model._ftrl_weights(opt.z.array[touched], opt.n.array[touched])
    )
    assert (weights == 0).any(), "L1 should zero out some coordinates"


def test_exported_scorer_matches_learner():
    indices, values, y = stream()
    model = OnlineLogisticRegression()
    model.learn_many(indices, values, y)
    scorer = model.export_scorer()
    np.testing.assert_allclose(
        scorer.predict_proba_many(indices, values), model.predict_proba_many(indices, values)
    )
    assert scorer.version == model.version


def test_state_round_trip_is_bit_identical_and_keeps_learning_identically():
    indices, values, y = stream()
    model = OnlineLogisticRegression()
    model.learn_many(indices[:200], values[:200], y[:200])
    clone = OnlineLogisticRegression()
    clone.load_state_dict(model.state_dict())
    assert np.array_equal(
        clone.predict_proba_many(indices, values), model.predict_proba_many(indices, values)
    )
    model.learn_many(indices[200:], values[200:], y[200:])
    clone.learn_many(indices[200:], values[200:], y[200:])
    assert np.array_equal(
        clone.predict_proba_many(indices, values), model.predict_proba_many(indices, values)
    )


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="ftrl"):
        OnlineLogisticRegression(optimizer="adagrad", l1=0.1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        OnlineLogisticRegression(optimizer="sgd")
