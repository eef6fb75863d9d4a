"""GBDT leaf features (He et al. 2014): LightGBM trees as a learned feature transform.

A :class:`TreeModel` is one trained, versioned LightGBM booster. Each example falls
into one leaf per tree; the (version, tree, leaf) triple is hashed into the LR's
coordinate space, so a logistic regression on raw + leaf features can weigh the
trees' learned conjunctions. A new version hashes to new coordinates, so weights
learnt for an old leaf space never leak into a new one.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(500, 3)); y = (X[:, 0] * X[:, 1] > 0).astype(int)
>>> model = TreeModel.fit(X, y, TreeSettings(num_trees=5, min_data_in_leaf=5), version=1)
>>> model.leaf_indices(X[:2], bits=18).shape
(2, 5)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import lightgbm as lgb
import numpy as np

from engine.config import TreeSettings


def _params(settings: TreeSettings) -> dict:
    return {
        "objective": "binary",
        "num_leaves": settings.num_leaves,
        "learning_rate": settings.learning_rate,
        "min_data_in_leaf": settings.min_data_in_leaf,
        "lambda_l2": settings.lambda_l2,
        "feature_fraction": settings.feature_fraction,
        "bagging_fraction": settings.bagging_fraction,
        "bagging_freq": settings.bagging_freq,
        "max_cat_to_onehot": settings.max_cat_to_onehot,
        "extra_trees": settings.extra_trees,
        "min_data_per_group": settings.min_data_in_leaf,
        "cat_smooth": 10.0,
        "seed": settings.seed,
        "deterministic": True,
        "num_threads": 1,
        "verbosity": -1,
    }


class TreeModel:
    """A trained booster plus the hashed coordinates of its leaves.

    ``base_margin`` is the log-odds of the training window's click rate: the GBDT's
    margin minus it is what the trees know beyond the base rate.
    """

    def __init__(
        self, booster: lgb.Booster, version: int, n_features: int, base_margin: float = 0.0
    ):
        self.booster = booster
        self.base_margin = base_margin
        self.version = version
        self.n_features = n_features
        self.num_trees = booster.num_trees()
        self._leaf_values: np.ndarray | None = None
        self._leaf_hashes: np.ndarray | None = None

    @classmethod
    def fit(
        cls,
        dense: np.ndarray,
        y: np.ndarray,
        settings: TreeSettings,
        version: int,
        categorical: Sequence[int] = (),
    ) -> TreeModel:
        """Train on one window of examples (``dense`` from the feature pipeline)."""
        data = lgb.Dataset(
            dense,
            label=np.asarray(y, dtype=np.float64),
            categorical_feature=list(categorical) or "auto",
            free_raw_data=True,
            params={"verbosity": -1},
        )
        booster = lgb.train(
            _params(settings), data, num_boost_round=settings.num_trees, keep_training_booster=True
        )
        rate = float(np.clip(np.mean(y), 1e-6, 1 - 1e-6))
        return cls(booster, version, dense.shape[1], float(np.log(rate / (1.0 - rate))))

    def predict_proba(self, dense: np.ndarray) -> np.ndarray:
        """The GBDT's own click probability (the "GBDT only" model)."""
        return self.booster.predict(dense, num_threads=1)

    def leaves(self, dense: np.ndarray) -> np.ndarray:
        """(n, num_trees) index of the leaf each example reaches in each tree."""
        return self.booster.predict(dense, pred_leaf=True, num_threads=1).astype(np.int64)

    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Per (tree, leaf): the leaf's output value and its unsalted 64-bit token hash."""
        if self._leaf_values is None:
            trees = self.booster.dump_model()["tree_info"]
            max_leaves = max(tree["num_leaves"] for tree in trees)
            values = np.zeros((self.num_trees, max_leaves), dtype=np.float64)
            for t, tree in enumerate(trees):
                stack = [tree["tree_structure"]]
                while stack:
                    node = stack.pop()
                    if "leaf_value" in node:
                        values[t, node.get("leaf_index", 0)] = node["leaf_value"]
                    else:
                        stack += [node["left_child"], node["right_child"]]
            hashes = np.empty((self.num_trees, max_leaves), dtype=np.uint64)
            for t in range(self.num_trees):
                for leaf in range(max_leaves):
                    token = f"gbdt\x1f{self.version}\x1f{t}\x1f{leaf}".encode()
                    digest = hashlib.blake2b(token, digest_size=8).digest()
                    hashes[t, leaf] = int.from_bytes(digest, "little")
            self._leaf_values, self._leaf_hashes = values, hashes
        return self._leaf_values, self._leaf_hashes

    def leaf_indices(self, dense: np.ndarray, bits: int) -> np.ndarray:
        """(n, num_trees) LR coordinates of the leaves each example reaches."""
        return self.leaf_features(dense, bits)[0]

    def leaf_features(self, dense: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
        """LR coordinates of the leaves reached, and the raw GBDT score, from one pass.

        The raw score is the sum of the reached leaves' values, which is exactly what
        LightGBM's ``raw_score`` prediction computes, so one tree traversal serves both.
        """
        values, hashes = self._tables()
        leaves = self.leaves(dense)
        trees = np.arange(self.num_trees)
        coordinates = (hashes[trees, leaves] & np.uint64((1 << bits) - 1)).astype(np.int64)
        return coordinates, values[trees, leaves].sum(axis=1)

    def to_string(self) -> str:
        return self.booster.model_to_string()

    @classmethod
    def from_string(
        cls, text: str, version: int, n_features: int, base_margin: float = 0.0
    ) -> TreeModel:
        return cls(lgb.Booster(model_str=text), version, n_features, base_margin)
