"""Online logistic regression on hashed sparse features.

:class:`OnlineLogisticRegression` wraps river's ``LogisticRegression`` with a
per-coordinate optimiser (AdaGrad or FTRL-Proximal). river's weights and optimiser
state stay the single source of truth: ``learn_one`` is river's own update, and
``learn_many`` is a vectorised mini-batch step that gathers the touched coordinates
from river's state, computes the summed gradient with numpy and writes the result
back. Serving uses :meth:`OnlineLogisticRegression.export_scorer`, a dense numpy
copy of the weights that scores thousands of candidates in one gather.

>>> import numpy as np
>>> model = OnlineLogisticRegression(lr=0.1)
>>> indices = np.array([[1, 7], [2, 7]]); values = np.ones((2, 2))
>>> _ = model.learn_many(indices, values, np.array([1, 0]))
>>> p = model.predict_proba_many(indices, values)
>>> bool(p[0] > 0.5 > p[1])
True
"""

from __future__ import annotations

import numpy as np
from river import linear_model, optim
from river.utils import VectorDict

from engine.config import LearnerSettings


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -35.0, 35.0)))


def _gather(state, keys: list[int]) -> np.ndarray:
    """Values of ``keys`` in river's weights or optimiser state (missing keys are 0)."""
    if isinstance(state, VectorDict):
        return np.asarray(state.to_numpy(keys), dtype=np.float64)
    # river's optimiser tables are defaultdicts: a missing key reads as 0.0 and is
    # written back by the caller anyway.
    return np.fromiter(map(state.__getitem__, keys), dtype=np.float64, count=len(keys))


class LinearScorer:
    """Read-only dense copy of a learner's weights, for serving.

    Scoring is a gather and a row sum, so one request's candidates cost one numpy call.
    """

    def __init__(self, weights: np.ndarray, intercept: float, version: int):
        self.weights = weights
        self.intercept = intercept
        self.version = version

    def decision_function(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        return (self.weights[indices] * values).sum(axis=1) + self.intercept

    def predict_proba_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        return sigmoid(self.decision_function(indices, values))


class OnlineLogisticRegression:
    """Logistic regression learned online by per-coordinate adaptive SGD.

    Parameters mirror :class:`engine.config.LearnerSettings`: ``optimizer`` is
    ``"adagrad"`` (with optional ``l2``) or ``"ftrl"`` (FTRL-Proximal with ``l1``,
    ``l2``, ``ftrl_alpha``, ``ftrl_beta``). Features are hashed coordinates; a bias
    token supplied by the feature pipeline plays the intercept, so river's own
    intercept is kept fixed at 0.
    """

    def __init__(
        self,
        optimizer: str = "adagrad",
        lr: float = 0.05,
        l1: float = 0.0,
        l2: float = 0.0,
        ftrl_alpha: float = 0.05,
        ftrl_beta: float = 1.0,
        batch_size: int = 256,
    ):
        if optimizer == "adagrad":
            if l1:
                raise ValueError("L1 needs the FTRL-Proximal optimiser: set optimizer = 'ftrl'")
            river_optimizer = optim.AdaGrad(lr=lr)
            model_l2 = l2
        elif optimizer == "ftrl":
            river_optimizer = optim.FTRLProximal(alpha=ftrl_alpha, beta=ftrl_beta, l1=l1, l2=l2)
            model_l2 = 0.0
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}: use 'adagrad' or 'ftrl'")
        self.settings = LearnerSettings(optimizer, lr, l1, l2, ftrl_alpha, ftrl_beta, batch_size)
        self.model = linear_model.LogisticRegression(
            optimizer=river_optimizer, l2=model_l2, intercept_lr=0.0
        )
        self.version = 0
        self.n_examples = 0

    @classmethod
    def from_settings(cls, settings: LearnerSettings) -> OnlineLogisticRegression:
        return cls(**vars(settings))

    # -- single examples (river's own code path) ---------------------------------------
    def learn_one(self, x: dict[int, float], y: int, w: float = 1.0) -> None:
        self.model.learn_one(x, bool(y), w)
        self.n_examples += 1
        self.version += 1

    def predict_proba_one(self, x: dict[int, float]) -> float:
        """Probability of a click for one example given as ``{coordinate: value}``."""
        return self.model.predict_proba_one(x)[True]

    # -- mini-batches -------------------------------------------------------------------
    def learn_many(
        self,
        indices: np.ndarray,
        values: np.ndarray,
        y: np.ndarray,
        sample_weight: np.ndarray | None = None,
        offset: np.ndarray | None = None,
    ) -> np.ndarray:
        """One mini-batch step; returns the probabilities predicted before the step.

        The gradient of each coordinate is summed over the batch, so a rare feature
        moves as far as it would under per-example updates. ``offset`` is a fixed
        per-example margin added to the logit (for example a GBDT's raw score), so
        the weights learn a correction on top of it.
        """
        n, width = indices.shape
        unique, inverse = np.unique(indices, return_inverse=True)
        inverse = inverse.reshape(-1)
        keys = unique.tolist()
        state = self.model.optimizer
        if self.settings.optimizer == "ftrl":
            z, nn = _gather(state.z, keys), _gather(state.n, keys)
            w = self._ftrl_weights(z, nn)
        else:
            w = _gather(self.model._weights, keys)
        margin = (w[inverse].reshape(n, width) * values).sum(axis=1) + self.model.intercept
        if offset is not None:
            margin = margin + offset
        proba = sigmoid(margin)
        residual = proba - np.asarray(y, dtype=np.float64)
        if sample_weight is not None:
            residual = residual * sample_weight
        clip = self.model.clip_gradient
        residual = np.clip(residual, -clip, clip)
        grad = np.bincount(
            inverse, weights=(values * residual[:, None]).reshape(-1), minlength=len(keys)
        )
        if self.settings.optimizer == "ftrl":
            sigma = (np.sqrt(nn + grad * grad) - np.sqrt(nn)) / state.alpha
            z += grad - sigma * w
            nn += grad * grad
            w = self._ftrl_weights(z, nn)
            state.z.update(zip(keys, z.tolist()))
            state.n.update(zip(keys, nn.tolist()))
        else:
            if self.model.l2:
                grad += self.model.l2 * np.bincount(inverse, minlength=len(keys)) * w
            g2 = _gather(state.g2, keys) + grad * grad
            w -= state.learning_rate * grad / np.sqrt(g2 + state.eps)
            state.g2.update(zip(keys, g2.tolist()))
        self.model._weights.update(dict(zip(keys, w.tolist())))
        self.model.intercept -= self.model.intercept_lr.get(state.n_iterations) * residual.sum()
        state.n_iterations += 1
        self.n_examples += n
        self.version += 1
        return proba

    def _ftrl_weights(self, z: np.ndarray, n: np.ndarray) -> np.ndarray:
        """FTRL-Proximal's closed-form weights from its (z, n) state."""
        opt = self.model.optimizer
        shrunk = z - np.sign(z) * opt.l1
        w = -shrunk / ((opt.beta + np.sqrt(n)) / opt.alpha + opt.l2)
        return np.where(np.abs(z) > opt.l1, w, 0.0)

    def decision_function(
        self, indices: np.ndarray, values: np.ndarray, offset: np.ndarray | None = None
    ) -> np.ndarray:
        unique, inverse = np.unique(indices, return_inverse=True)
        w = _gather(self.model._weights, unique.tolist())
        margin = (w[inverse].reshape(indices.shape) * values).sum(axis=1) + self.model.intercept
        return margin if offset is None else margin + offset

    def predict_proba_many(
        self, indices: np.ndarray, values: np.ndarray, offset: np.ndarray | None = None
    ) -> np.ndarray:
        return sigmoid(self.decision_function(indices, values, offset))

    # -- export and state ---------------------------------------------------------------
    def export_scorer(self, bits: int) -> LinearScorer:
        """Dense copy of the current weights over a ``2**bits`` space, for serving."""
        dense = np.zeros(1 << bits, dtype=np.float64)
        keys, weights = self.coefficients()
        if len(keys) and keys.max() >= len(dense):
            raise ValueError(f"a coordinate exceeds the {bits}-bit feature space")
        dense[keys] = weights
        return LinearScorer(dense, float(self.model.intercept), self.version)

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """(coordinates, weights) of every weight river holds."""
        weights = self.model._weights
        keys = list(weights.keys())
        return np.array(keys, dtype=np.int64), np.asarray(weights.to_numpy(keys), dtype=np.float64)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every number needed to continue learning exactly where this model stands."""
        keys, weights = self.coefficients()
        opt = self.model.optimizer
        tables = {"z": opt.z, "n": opt.n} if self.settings.optimizer == "ftrl" else {"g2": opt.g2}
        state = {
            "weight_keys": keys,
            "weight_values": weights,
            "scalars": np.array(
                [self.model.intercept, opt.n_iterations, self.version, self.n_examples],
                dtype=np.float64,
            ),
        }
        for name, table in tables.items():
            state[f"{name}_keys"] = np.fromiter(table.keys(), dtype=np.int64, count=len(table))
            state[f"{name}_values"] = np.fromiter(
                table.values(), dtype=np.float64, count=len(table)
            )
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        fresh = OnlineLogisticRegression(**vars(self.settings))
        model, opt = fresh.model, fresh.model.optimizer
        model._weights.update(
            dict(zip(state["weight_keys"].tolist(), state["weight_values"].tolist()))
        )
        intercept, n_iterations, version, n_examples = state["scalars"].tolist()
        model.intercept = intercept
        opt.n_iterations = int(n_iterations)
        names = ("z", "n") if self.settings.optimizer == "ftrl" else ("g2",)
        for name in names:
            getattr(opt, name).update(
                zip(state[f"{name}_keys"].tolist(), state[f"{name}_values"].tolist())
            )
        self.model, self.version, self.n_examples = model, int(version), int(n_examples)
