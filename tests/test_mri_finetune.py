"""MRI fine-tuning from a CT checkpoint (issue 11.3): ``tools/finetune_seg.py --dataset brats``
on a synthetic 4-channel BraTS replica, from a 1-channel T3D checkpoint, and the preprocessing
record's refusal of a CT-windowed model on MR data. Tiny: t3d-tiny-cpu (feature_size 12, 64³
ROI, window 4), 1 step, 1 test study."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def brats(tmp_path_factory) -> dict[str, Path]:
    """A BraTS 2023 replica (3 patients, one with 2 timepoints), imported and prepared, and a
    1-channel random-init T3D checkpoint (t3d-tiny-cpu)."""
    import torch
    from t3d_data import prepare
    from t3d_data.sources import import_dataset, write_import
    from t3d_data.sources.replica import write_replica
    from t3d_models import T3DModel

    root = tmp_path_factory.mktemp("brats")
    write_replica("brats", root / "raw", n=3, shape=(24, 24, 16))
    write_import(import_dataset("brats", root / "raw"), root / "brats.jsonl")
    prepare(root / "brats.jsonl", root / "store", progress=False)
    torch.manual_seed(0)
    T3DModel.from_preset("t3d-tiny-cpu").save_pretrained(root / "ckpt")
    return {"root": root, "store": root / "store", "ckpt": root / "ckpt"}


def _main():
    return runpy.run_path(str(ROOT / "tools" / "finetune_seg.py"), run_name="finetune_seg")["main"]


def test_finetune_seg_brats_from_a_one_channel_ct_checkpoint(brats, capsys):
    from t3d_data import VolumeStore

    store = VolumeStore(brats["store"])
    assert {store.n_channels(i) for i in range(len(store))} == {4}
    config = json.loads((brats["ckpt"] / "config.json").read_text(encoding="utf-8"))
    assert config["vision"]["in_channels"] == 1
    assert config["preprocessing"]["intensity"] == "hu_window_linear"
    out = brats["root"] / "out"
    args = ["--dataset", "brats", "--checkpoint", str(brats["ckpt"]), "--store",
            str(brats["store"]), "--out", str(out), "--steps", "1", "--fraction", "1",
            "--set", "batch_size=1", "--set", "samples_per_volume=1", "--set", "max_test=1",
            "--set", "overlays=1"]
    assert _main()(args) == 0
    res = json.loads((out / "seg-t3d.json").read_text(encoding="utf-8"))
    assert res["in_channels"] == 4 and res["modality"] == "MR"
    assert res["channel_adapt"] == {"mode": "repeat", "from_channels": 1}
    # the fine-tune's record says the policy it trained with, not the checkpoint's HU window
    assert res["preprocessing"]["intensity"] == "zscore_foreground"
    assert res["config"]["classes"] == {"NCR": [1], "ED": [2], "ET": [3, 4]}
    assert set(res["dice"]) == {"NCR", "ED", "ET", "mean"}
    assert res["test_studies"] == 1 and res["train_studies_labelled"] == 2  # the val split
    assert all(0.0 <= v <= 1.0 for v in res["dice"].values() if v == v)
    assert Path(res["overlays"][0]).is_file()
    printed = capsys.readouterr().out
    assert "over 3 classes on 1 test studies" in printed and "--scratch" in printed


def test_scratch_arm_gets_the_same_four_channels(brats):
    from t3d_train.eval_config import SegmentationConfig
    from t3d_train.segmentation import build_network, store_channels

    cfg = SegmentationConfig(store=brats["store"], dataset="brats", scratch=True)
    assert store_channels(cfg) == (4, "MR")
    net, _ = build_network(cfg, 4, in_channels=4)
    assert net.swinViT.patch_embed.proj.weight.shape[1] == 4
    assert net.encoder1.layer.conv1.conv.weight.shape[1] == 4


def test_a_ct_windowed_checkpoint_is_refused_on_mr_data_unless_fine_tuning_sets_the_policy(
        brats):
    from t3d_models import T3DModelConfig
    from t3d_train.config import ConfigError
    from t3d_train.preprocessing import resolve_preprocessing

    ct = T3DModelConfig.from_json(str(brats["ckpt"] / "config.json"))
    section = SimpleNamespace(checkpoint=brats["ckpt"], hu_window=None, intensity=None,
                              force_preprocessing=False)
    # no policy given: MR under the checkpoint's HU window is refused, the fix named
    with pytest.raises(ConfigError, match=r"the store holds MR studies but the model's "
                                          r"preprocessing record .* windows CT HU .* "
                                          r"--set model\.intensity=zscore_foreground"):
        resolve_preprocessing(section, ct, modality="MR", finetune=True)
    # the same through the tool: classes given, no --dataset (so no policy), nothing trained
    args = ["--checkpoint", str(brats["ckpt"]), "--store", str(brats["store"]), "--set",
            "classes={NCR: [1]}", "--set", "test_split=val", "--out", str(brats["root"] / "x")]
    with pytest.raises(ConfigError, match="MR has no HU"):
        _main()(args)
    # fine-tuning sets the new policy explicitly: allowed, and the record says zscore
    section.intensity = "zscore_foreground"
    prep = resolve_preprocessing(section, ct, modality="MR", finetune=True)
    assert prep.intensity == "zscore_foreground" and ct.preprocessing.intensity == "hu_window_linear"
    # a frozen encoder evaluated with another policy than its own: refused unless forced
    with pytest.raises(ConfigError, match=r"model\.intensity=zscore_foreground disagrees with "
                                          r"the policy the model was pre-trained with, "
                                          r"hu_window_linear"):
        resolve_preprocessing(section, ct, modality="MR")
    section.force_preprocessing = True
    assert resolve_preprocessing(section, ct, modality="MR").intensity == "zscore_foreground"
    # and the CT path is unchanged: the recorded window and policy
    plain = SimpleNamespace(checkpoint=brats["ckpt"], hu_window=None, force_preprocessing=False)
    assert resolve_preprocessing(plain, ct) == ct.preprocessing


def test_dataset_brats_on_a_ct_store_names_the_fix(tmp_path):
    import nibabel as nib
    import numpy as np
    from t3d_data import prepare
    from t3d_train.config import ConfigError
    from t3d_train.eval_config import SegmentationConfig
    from t3d_train.segmentation import store_channels

    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 40, np.int16), np.eye(4)), tmp_path / "ct.nii")
    (tmp_path / "m.jsonl").write_text(json.dumps(
        {"study_id": "ct", "patient_id": "p", "image": "ct.nii", "split": "val"}) + "\n")
    prepare(tmp_path / "m.jsonl", tmp_path / "store", progress=False)
    cfg = SegmentationConfig(store=tmp_path / "store", dataset="brats", scratch=True)
    assert cfg.test_split == "val" and cfg.model.intensity == "zscore_foreground"
    with pytest.raises(ConfigError, match=r"dataset: brats expects MR studies but .* holds CT "
                                          r"\(1 channel\(s\)\); prepare the manifest of "
                                          r"`t3d-data import brats ROOT -o MANIFEST`"):
        store_channels(cfg)
    assert store_channels(cfg.model_copy(update={"dataset": None})) == (1, "CT")
