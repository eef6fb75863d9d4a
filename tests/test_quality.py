"""GBDT + LR against LR alone and Vowpal Wabbit on the real click logs.

Same settings file for every dataset, same progressive-validation stream for every
model. These are the figures the README reports; a change that loses them fails here.
"""

from pathlib import Path

import pytest

from engine.config import load_settings
from engine.datasets import SCHEMAS, read_log
from engine.replay import Replay

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LOGS = {
    "criteo": DATA / "criteo" / "criteo_dac_rows_1_8000.tsv",
    "avazu": DATA / "avazu" / "avazu_rows_1_7000.csv",
    "talkingdata": DATA / "talkingdata" / "talkingdata_2017-11-06_to_08.csv",
}


@pytest.mark.parametrize("fmt", sorted(LOGS))
def test_gbdt_lr_beats_lr_and_vowpal_wabbit(fmt):
    path = LOGS[fmt]
    if not path.exists():
        pytest.skip(f"{path} not present")
    result = Replay(load_settings(), SCHEMAS[fmt]).run(read_log(path, fmt))
    ne = {name: figures["ne"] for name, figures in result.metrics.items()}
    assert ne["gbdt_lr"] < ne["lr"], ne
    assert ne["gbdt_lr"] < ne["vw"], ne
    if fmt == "criteo":
        assert ne["gbdt_lr"] <= 0.99 * ne["lr"], ne
