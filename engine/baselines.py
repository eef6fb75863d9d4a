"""Vowpal Wabbit as a peer model, fed the same hashed features as our learners.

VW reads text examples; each hashed coordinate is written as an integer feature
name, which VW uses as the index itself (``--hash strings`` keeps numeric names),
so both models learn from identical inputs. VW runs with logistic loss and its
default adaptive, normalised, invariant updates.
"""

from __future__ import annotations

import numpy as np


class VowpalWabbitModel:
    """Progressive-validation wrapper: predict each example, then learn it."""

    def __init__(self, bits: int, extra_args: str = ""):
        from vowpalwabbit import Workspace

        self.bits = bits
        self.workspace = Workspace(
            f"--loss_function logistic --link logistic -b {bits} --quiet {extra_args}".strip()
        )

    @staticmethod
    def format_examples(indices: np.ndarray, y: np.ndarray | None = None) -> list[str]:
        """VW text lines for a batch (label -1/1, one namespace of integer features)."""
        labels = [
            "" if y is None else ("1 " if label else "-1 ")
            for label in (y if y is not None else [None] * len(indices))
        ]
        return [
            f"{label}|f {' '.join(map(str, row))}"
            for label, row in zip(labels, indices.tolist(), strict=True)
        ]

    def learn_lines(self, lines: list[str]) -> np.ndarray:
        """Learn each line in order; returns the probability VW gave it before learning."""
        workspace = self.workspace
        out = np.empty(len(lines), dtype=np.float64)
        for i, line in enumerate(lines):
            example = workspace.parse(line)
            workspace.learn(example)
            out[i] = example.get_simplelabel_prediction()
            workspace.finish_example(example)
        return out

    def learn_many(self, indices: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.learn_lines(self.format_examples(indices, y))

    def predict_proba_many(self, indices: np.ndarray) -> np.ndarray:
        return np.array([self.workspace.predict(line) for line in self.format_examples(indices)])

    def close(self) -> None:
        self.workspace.finish()
