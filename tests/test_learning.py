"""T3D must learn: with the library defaults the contrastive terms fall clearly below chance in a
tiny fixed setting and the crop embedding stays spread out (``tools/learning_check.py``, run
here through its command line).

With the defaults before the collapse fix (plain MLP heads, one learning rate for every tower,
τ = 0.07) the same run collapses within ~5 steps: TCL and alignment sit at exactly log(N-1) and
log(B), and the cross-study cosine of the crop embeddings goes to 1
(``tools/learning_check.py --compare``; docs/pretraining.md).
"""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

#: tools/learning_check.py's functions (the script, not run as ``__main__``)
learning_check = SimpleNamespace(**runpy.run_path(
    str(Path(__file__).resolve().parents[1] / "tools" / "learning_check.py"),
    run_name="learning_check"))


@pytest.mark.slow
def test_defaults_learn_below_chance_without_collapse(tmp_path, capsys):
    from t3d_objectives import is_collapsed

    log = tmp_path / "log.jsonl"
    assert learning_check.main(["--threads", "2", "--log", str(log)]) == 0
    assert "| new defaults" in capsys.readouterr().out
    lines = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()]
    records, end = [x for x in lines if "step" in x], lines[-1]["summary"]
    chance = learning_check.chance()
    assert len(records) == learning_check.STEPS
    # training losses (mean of the last 10 steps) clearly below chance; each of the old
    # defaults, and each change alone, stays above these bounds (tools/learning_check.py --compare)
    assert end["tcl_loss"] < 0.85 * chance["tcl_loss"], (end, chance)
    assert end["align_loss"] < 0.85 * chance["align_loss"], (end, chance)
    # on crops never drawn in training, in eval mode (BatchNorm running statistics): below chance
    assert end["eval_tcl_loss"] < 0.9 * chance["tcl_loss"], (end, chance)
    assert end["eval_align_loss"] < 0.9 * chance["align_loss"], (end, chance)
    # the spread stays open at every step and in eval mode (where BatchNorm cannot hide a
    # collapsed encoder), and crops of one study are closer than crops of two
    for r in records:
        assert not is_collapsed({k[len("visual_"):]: v for k, v in r.items()
                                 if k.startswith("visual_")}), r
    assert end["eval_visual_std_ratio"] > 0.3, end
    assert end["eval_visual_same_cos"] > end["eval_visual_cross_cos"] + 0.1, end


def test_chance_values_come_from_the_objective():
    """TCL log(N-1) over 4 studies x 2 crops, alignment log B; no entry for TIR (left out)."""
    assert learning_check.chance() == pytest.approx({"tcl_loss": math.log(7),
                                                     "align_loss": math.log(4)})


def test_bad_arguments_are_one_line(capsys):
    with pytest.raises(SystemExit) as err:
        learning_check.main(["--steps", "0"])
    assert err.value.code == 2 and "--steps must be >= 1" in capsys.readouterr().err
