"""The click model: feature pipeline -> GBDT leaves -> online LR -> recalibrated pCTR.

Once trees exist, the served probability is a mixture of the online LR's (on raw,
leaf and GBDT-margin features) and the GBDT's own, weighted by ``features.gbdt_blend``:
the two models err differently, and averaging them lowers the variance that neither
the LR's margin feature nor its leaf weights remove on their own. The mixture is taken
in probability space, where it preserves the mean, so two calibrated models give a
calibrated blend (a logit-space average under-predicts where they disagree).

:class:`CtrModel` bundles the pieces that must move together (feature spec, tree
version, LR weights, downsampling rate) so that training, replay and serving call
the same code, and so that one snapshot restores all of them at once.

>>> from engine.config import Settings
>>> from engine.features import FeatureSpec
>>> model = CtrModel(FeatureSpec(categorical=("ad",), bits=16), Settings())
>>> batch = model.pipeline.transform_many([{"ad": "a1"}, {"ad": "a2"}])
>>> _ = model.learn_many(batch, np.array([1, 0]))
>>> model.predict_proba_many(batch).shape
(2,)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from engine.calibration import recalibrate
from engine.config import FeatureSettings, Settings
from engine.features import ClickCounts, FeatureBatch, FeaturePipeline, FeatureSpec
from engine.learner import LinearScorer, OnlineLogisticRegression, sigmoid
from engine.snapshot import SnapshotError, SnapshotStore
from engine.trees import TreeModel

MARGIN_TOKEN = ("\x00gbdt", "margin")
FORMAT = "adengine.ctr-model/1"


class CtrModel:
    """GBDT + LR click model with recalibration for negative downsampling."""

    def __init__(self, spec: FeatureSpec, settings: Settings, use_trees: bool = True):
        self.spec = spec
        self.settings = settings
        self.use_trees = use_trees
        features = settings.features
        counts = ClickCounts(spec.bits, features.count_prior) if features.count_features else None
        self.pipeline = FeaturePipeline(spec, counts=counts, category_codes=features.category_codes)
        self.learner = OnlineLogisticRegression.from_settings(settings.learner, spec.bits)
        self.trees: TreeModel | None = None
        self.downsampling_rate = settings.calibration.negative_downsampling_rate
        self.margin_index = self.pipeline.hash_index(*MARGIN_TOKEN)

    @property
    def version(self) -> str:
        """``t<tree version>.w<weight version>``: what an impression records as model_version."""
        tree_version = self.trees.version if self.trees is not None else 0
        return f"t{tree_version}.w{self.learner.version}"

    def fit_trees(self, dense: np.ndarray, y: np.ndarray, version: int) -> TreeModel:
        """Train a GBDT on this model's dense features (its categorical columns declared)."""
        return TreeModel.fit(
            dense, y, self.settings.trees, version, self.pipeline.categorical_columns
        )

    def set_trees(self, trees: TreeModel | None) -> None:
        """Move the LR onto a new leaf space (new coordinates start from zero weight)."""
        self.trees = trees if self.use_trees else None

    def augment(self, batch: FeatureBatch) -> FeatureBatch:
        """The LR's input: raw tokens plus, once trees exist, leaf tokens and the margin."""
        return self.lr_input(batch)[0]

    def lr_input(self, batch: FeatureBatch) -> tuple[FeatureBatch, np.ndarray | None]:
        """The LR's input and the GBDT's raw margin (``None`` before any trees exist)."""
        trees = self.trees
        if trees is None:
            return batch, None
        leaves, margin = trees.leaf_features(batch.dense, self.spec.bits)
        features = self.settings.features
        # Centred on the training window's base rate, the margin feature carries only
        # what the trees know beyond the average, which the LR's bias already holds.
        centred = margin - trees.base_margin
        # Leaf tokens get a small fixed value: under AdaGrad a fresh coordinate's first
        # step moves the margin by about lr * value, and every refresh brings fresh
        # coordinates, which at the raw tokens' value would swamp the raw weights.
        indices = np.hstack([leaves, np.full((len(batch), 1), self.margin_index)])
        values = np.hstack(
            [np.full(leaves.shape, features.leaf_value), centred[:, None] * features.margin_scale]
        )
        return batch.with_extra(indices, values), margin

    # -- estimator API ------------------------------------------------------------------
    def learn_many(self, batch: FeatureBatch, y: np.ndarray) -> np.ndarray:
        """Learn a (downsampled) batch; returns the LR's raw pre-update probabilities."""
        if len(batch) == 0:
            return np.empty(0)
        augmented = self.augment(batch)
        return self.learner.learn_many(augmented.indices, augmented.values, y)

    def predict_proba_many(
        self, batch: FeatureBatch, scorer: LinearScorer | None = None
    ) -> np.ndarray:
        """Recalibrated click probabilities (what the auction uses).

        Without trees this is the LR's probability; with trees,
        ``(1 - gbdt_blend) * p_LR + gbdt_blend * p_GBDT``. The LR itself learns from its
        own margin (:meth:`learn_many`), not from the blend.
        """
        augmented, tree_margin = self.lr_input(batch)
        source = self.learner if scorer is None else scorer
        return self.calibrated(
            source.decision_function(augmented.indices, augmented.values), tree_margin
        )

    def calibrated(self, lr_margin: np.ndarray, tree_margin: np.ndarray | None) -> np.ndarray:
        """Mix the LR's and the trees' probabilities, then undo negative downsampling."""
        p = sigmoid(lr_margin)
        if tree_margin is not None:
            blend = self.settings.features.gbdt_blend
            p = (1.0 - blend) * p + blend * sigmoid(tree_margin)
        return recalibrate(p, self.downsampling_rate)

    def export_scorer(self) -> LinearScorer:
        return self.learner.export_scorer()

    # -- snapshots ----------------------------------------------------------------------
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Every array and setting needed to rebuild this model exactly (see ``from_state``)."""
        arrays = dict(self.learner.state_dict())
        meta = {
            "format": FORMAT,
            "model_version": self.version,
            "downsampling_rate": self.downsampling_rate,
            "spec": {
                "categorical": self.spec.categorical,
                "numeric": self.spec.numeric,
                "crosses": self.spec.crosses,
                "bits": self.spec.bits,
                "salt": self.spec.salt,
            },
            "features": dataclasses.asdict(self.settings.features),
            "learner": vars(self.learner.settings),
            "use_trees": self.use_trees,
            "trees": None,
        }
        if self.trees is not None:
            arrays["trees"] = np.frombuffer(self.trees.to_string().encode(), dtype=np.uint8)
            meta["trees"] = {
                "version": self.trees.version,
                "n_features": self.trees.n_features,
                "base_margin": self.trees.base_margin,
            }
        if self.pipeline.counts is not None:
            arrays.update(self.pipeline.counts.state_dict())
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict, settings: Settings) -> CtrModel:
        """Rebuild a model from :meth:`state`; its feature settings come from the state."""
        if meta.get("format") != FORMAT:
            raise SnapshotError(f"unsupported snapshot format {meta.get('format')!r}")
        raw_spec = meta["spec"]
        spec = FeatureSpec(
            tuple(raw_spec["categorical"]),
            tuple(raw_spec["numeric"]),
            tuple(tuple(pair) for pair in raw_spec["crosses"]),
            raw_spec["bits"],
            raw_spec["salt"],
        )
        features = dict(meta["features"])
        features["crosses"] = tuple(tuple(pair) for pair in features["crosses"])
        settings = dataclasses.replace(settings, features=FeatureSettings(**features))
        model = cls(spec, settings, use_trees=meta["use_trees"])
        model.learner = OnlineLogisticRegression(**meta["learner"], bits=spec.bits)
        model.learner.load_state_dict(arrays)
        model.downsampling_rate = meta["downsampling_rate"]
        if model.pipeline.counts is not None and "count_scalars" in arrays:
            model.pipeline.counts.load_state_dict(arrays)
        if meta["trees"] is not None:
            text = arrays["trees"].tobytes().decode()
            model.trees = TreeModel.from_string(text, **meta["trees"])
        return model

    def snapshot(self, store: SnapshotStore) -> Path:
        """Save a new snapshot version atomically; returns its path."""
        return store.save(*self.state())

    @classmethod
    def restore(cls, store: SnapshotStore, settings: Settings) -> CtrModel:
        """Rebuild the model from the latest snapshot (raises SnapshotError if damaged)."""
        return cls.from_state(*store.load_latest(), settings)
