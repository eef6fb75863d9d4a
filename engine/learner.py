"""Online logistic regression on hashed sparse features.

:class:`OnlineLogisticRegression` is river's ``LogisticRegression`` with a
per-coordinate optimiser (AdaGrad or FTRL-Proximal). Its weights and the optimiser's
per-coordinate tables live in :class:`DenseTable` s: dict-like views over numpy
vectors of ``2**bits`` entries that river's own code reads and writes. So river's
state stays the single source of truth: ``learn_one`` is river's own update, and
``learn_many`` is a vectorised mini-batch step over the very same arrays (a gather of
the touched coordinates, a summed gradient, a scatter back). Serving uses
:meth:`OnlineLogisticRegression.export_scorer`, a copy of the weight vector.

>>> import numpy as np
>>> model = OnlineLogisticRegression(lr=0.1, bits=8)
>>> indices = np.array([[1, 7], [2, 7]]); values = np.ones((2, 2))
>>> _ = model.learn_many(indices, values, np.array([1, 0]))
>>> p = model.predict_proba_many(indices, values)
>>> bool(p[0] > 0.5 > p[1])
True
>>> bool(model.predict_proba_one({1: 1.0, 7: 1.0}) == p[0])
True
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import numpy as np
from river import linear_model, optim

from engine.config import LearnerSettings


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -35.0, 35.0)))


class DenseTable(MutableMapping):
    """A ``{coordinate: float}`` mapping stored in a dense numpy vector.

    Missing coordinates read as 0.0, like the ``defaultdict(float)`` tables river's
    optimisers keep, so river's per-example code runs on it unchanged while the
    mini-batch path indexes ``array`` directly.
    """

    __slots__ = ("array",)

    def __init__(self, size: int):
        self.array = np.zeros(size, dtype=np.float64)

    def __getitem__(self, key) -> float:
        return float(self.array[key])

    def __setitem__(self, key, value) -> None:
        self.array[key] = value

    def __delitem__(self, key) -> None:
        self.array[key] = 0.0

    def get(self, key, default=0.0) -> float:
        return float(self.array[key])

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self.array).tolist())

    def __len__(self) -> int:
        return int(np.count_nonzero(self.array))

    def __contains__(self, key) -> bool:
        return bool(self.array[key] != 0.0)

    def dot(self, x: dict) -> float:
        """What river's GLM calls to score one example."""
        return float(sum(self.array[k] * v for k, v in x.items()))

    def to_dict(self) -> dict[int, float]:
        keys = np.flatnonzero(self.array)
        return dict(zip(keys.tolist(), self.array[keys].tolist()))

    def to_numpy(self, keys) -> np.ndarray:
        return self.array[np.asarray(keys, dtype=np.int64)]


class _DenseLogisticRegression(linear_model.LogisticRegression):
    """river's LogisticRegression with its weights held in a :class:`DenseTable`.

    river's VectorDict weights are swapped for a dense table; learn mode (which only
    masks the default initialiser, zero here) is a no-op, and the L2 term is added to
    a plain dict gradient because VectorDict arithmetic expects VectorDict operands.
    """

    def __init__(self, size: int, **params):
        super().__init__(**params)
        self._weights = DenseTable(size)

    def _enter_learn_mode(self, mask=None):
        return self._weights

    def _exit_learn_mode(self, weights):
        self._weights = weights

    def _eval_gradient_one(self, x: dict, y: float, w: float):
        loss_gradient = self.loss.gradient(y_true=y, y_pred=self._raw_dot_one(x)) * w
        loss_gradient = float(np.clip(loss_gradient, -self.clip_gradient, self.clip_gradient))
        weights = self._weights.array
        gradient = {
            k: v * loss_gradient + self.l2 * weights[k] if self.l2 else v * loss_gradient
            for k, v in x.items()
        }
        return gradient, loss_gradient


class LinearScorer:
    """Read-only copy of a learner's weights, for serving.

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
    ``l2``, ``ftrl_alpha``, ``ftrl_beta``). Coordinates are hashed features in
    ``[0, 2**bits)``; a bias token supplied by the feature pipeline plays the
    intercept, so river's own intercept stays at 0.
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
        bits: int = 20,
    ):
        size = 1 << bits
        if optimizer == "adagrad":
            if l1:
                raise ValueError("L1 needs the FTRL-Proximal optimiser: set optimizer = 'ftrl'")
            river_optimizer = optim.AdaGrad(lr=lr)
            river_optimizer.g2 = DenseTable(size)
            model_l2 = l2
        elif optimizer == "ftrl":
            river_optimizer = optim.FTRLProximal(alpha=ftrl_alpha, beta=ftrl_beta, l1=l1, l2=l2)
            river_optimizer.z, river_optimizer.n = DenseTable(size), DenseTable(size)
            model_l2 = 0.0
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}: use 'adagrad' or 'ftrl'")
        self.settings = LearnerSettings(optimizer, lr, l1, l2, ftrl_alpha, ftrl_beta, batch_size)
        self.bits = bits
        self.model = _DenseLogisticRegression(
            size, optimizer=river_optimizer, l2=model_l2, intercept_lr=0.0
        )
        self.version = 0
        self.n_examples = 0

    @classmethod
    def from_settings(cls, settings: LearnerSettings, bits: int = 20) -> OnlineLogisticRegression:
        return cls(**vars(settings), bits=bits)

    @property
    def _tables(self) -> dict[str, DenseTable]:
        """Every dense vector of state, by name (weights plus the optimiser's tables)."""
        opt = self.model.optimizer
        tables = {"weights": self.model._weights}
        if self.settings.optimizer == "ftrl":
            tables.update(z=opt.z, n=opt.n)
        else:
            tables.update(g2=opt.g2)
        return tables

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
    ) -> np.ndarray:
        """One mini-batch step; returns the probabilities predicted before the step.

        The gradient of each coordinate is summed over the batch, so a rare feature
        moves as far as it would under per-example updates. AdaGrad follows river's
        rule exactly (a batch of one is river's ``learn_one``). FTRL-Proximal reads and
        writes river's ``z`` and ``n`` tables and sets each touched weight from them by
        the closed form after the step; river's own ``learn_one`` sets a weight from
        ``z`` and ``n`` just before it updates them, i.e. one step behind.
        """
        n, width = indices.shape
        keys, inverse = np.unique(indices, return_inverse=True)
        inverse = inverse.reshape(-1)
        opt = self.model.optimizer
        weights = self.model._weights.array
        if self.settings.optimizer == "ftrl":
            z, nn = opt.z.array[keys], opt.n.array[keys]
            w = self._ftrl_weights(z, nn)
        else:
            w = weights[keys]
        margin = (w[inverse].reshape(n, width) * values).sum(axis=1) + self.model.intercept
        proba = sigmoid(margin)
        residual = proba - np.asarray(y, dtype=np.float64)
        if sample_weight is not None:
            residual = residual * sample_weight
        residual = np.clip(residual, -self.model.clip_gradient, self.model.clip_gradient)
        grad = np.bincount(
            inverse, weights=(values * residual[:, None]).reshape(-1), minlength=len(keys)
        )
        if self.settings.optimizer == "ftrl":
            sigma = (np.sqrt(nn + grad * grad) - np.sqrt(nn)) / opt.alpha
            opt.z.array[keys] = z + grad - sigma * w
            opt.n.array[keys] = nn + grad * grad
            w = self._ftrl_weights(opt.z.array[keys], opt.n.array[keys])
        else:
            if self.model.l2:
                grad += self.model.l2 * np.bincount(inverse, minlength=len(keys)) * w
            g2 = opt.g2.array[keys] + grad * grad
            opt.g2.array[keys] = g2
            w = w - opt.learning_rate * grad / np.sqrt(g2 + opt.eps)
        weights[keys] = w
        self.model.intercept -= self.model.intercept_lr.get(opt.n_iterations) * residual.sum()
        opt.n_iterations += 1
        self.n_examples += n
        self.version += 1
        return proba

    def _ftrl_weights(self, z: np.ndarray, n: np.ndarray) -> np.ndarray:
        """FTRL-Proximal's closed-form weights from its (z, n) state."""
        opt = self.model.optimizer
        shrunk = z - np.sign(z) * opt.l1
        w = -shrunk / ((opt.beta + np.sqrt(n)) / opt.alpha + opt.l2)
        return np.where(np.abs(z) > opt.l1, w, 0.0)

    def decision_function(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        weights = self.model._weights.array
        return (weights[indices] * values).sum(axis=1) + self.model.intercept

    def predict_proba_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        return sigmoid(self.decision_function(indices, values))

    # -- export and state ---------------------------------------------------------------
    def export_scorer(self) -> LinearScorer:
        """A frozen copy of the current weights, for serving."""
        weights = self.model._weights.array.copy()
        return LinearScorer(weights, float(self.model.intercept), self.version)

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """(coordinates, weights) of every non-zero weight."""
        weights = self.model._weights.array
        keys = np.flatnonzero(weights)
        return keys, weights[keys]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every number needed to continue learning exactly where this model stands."""
        opt = self.model.optimizer
        state = {
            "scalars": np.array(
                [self.model.intercept, opt.n_iterations, self.version, self.n_examples],
                dtype=np.float64,
            )
        }
        for name, table in self._tables.items():
            keys = np.flatnonzero(table.array)
            state[f"{name}_keys"], state[f"{name}_values"] = keys, table.array[keys]
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        fresh = OnlineLogisticRegression(**vars(self.settings), bits=self.bits)
        for name, table in fresh._tables.items():
            keys = state[f"{name}_keys"]
            if len(keys) and keys.max() >= len(table.array):
                raise ValueError(f"state has coordinates beyond the {self.bits}-bit space")
            table.array[keys] = state[f"{name}_values"]
        intercept, n_iterations, version, n_examples = state["scalars"].tolist()
        fresh.model.intercept = intercept
        fresh.model.optimizer.n_iterations = int(n_iterations)
        self.model, self.version, self.n_examples = fresh.model, int(version), int(n_examples)
