import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from t3d_models import T3DModel
from t3d_models.io import check_state_dict


def test_layout_and_no_temp_files(tiny_ckpt):
    assert sorted(os.listdir(tiny_ckpt)) == ["README.md", "config.json", "model.safetensors",
                                             "text_encoder"]
    assert "tokenizer.json" in os.listdir(tiny_ckpt / "text_encoder")
    cfg = json.loads((tiny_ckpt / "config.json").read_text(encoding="utf-8"))
    assert cfg["name"] == "t3d-tiny-cpu" and cfg["text"]["model_name_or_path"] == "minilm"
    keys = load_file(tiny_ckpt / "model.safetensors").keys()
    assert any(k.startswith("text.model.encoder.layer.5.") for k in keys)  # self-contained
    assert any(k.startswith("vision.swin.swinViT.") for k in keys)


def test_round_trip_is_exact(tiny_model, tiny_ckpt, tiny_batch):
    loaded = T3DModel.from_pretrained(tiny_ckpt).eval()
    assert loaded.config == tiny_model.config
    ref, got = tiny_model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), k
    b = {k: v for k, v in tiny_batch.items() if k not in ("corrupted", "corruption_mask")}
    b.update(crops=b["crops"][:1], study_index=torch.tensor([0]), group=torch.tensor([0]),
             input_ids=b["input_ids"][:1], attention_mask=b["attention_mask"][:1])
    with torch.no_grad():
        a, c = tiny_model(**b), loaded(**b)
    for k in a:
        assert torch.equal(a[k], c[k]), k
    assert loaded.tokenize(["No acute findings."])["input_ids"].tolist() == \
        tiny_model.tokenize(["No acute findings."])["input_ids"].tolist()


def test_save_twice_overwrites_atomically(tiny_model, tmp_path):
    path = tmp_path / "ck"
    tiny_model.save_pretrained(path)
    tiny_model.save_pretrained(path, card={"steps": 3})
    assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors",
                                        "text_encoder"]
    assert "- steps: 3" in (path / "README.md").read_text(encoding="utf-8")  # the new card


def test_refuses_missing_unexpected_and_mismatched_keys(tiny_ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    state = load_file(bad / "model.safetensors")
    state.pop("proj_t.0.bias")
    state["proj_t.extra"] = torch.zeros(3)
    state["proj_v.3.weight"] = torch.zeros(5, 5)
    save_file(state, bad / "model.safetensors")
    with pytest.raises(ValueError) as err:
        T3DModel.from_pretrained(bad)
    msg = str(err.value)
    assert "missing keys (1): proj_t.0.bias" in msg
    assert "unexpected keys (1): proj_t.extra" in msg
    assert "proj_v.3.weight: checkpoint (5, 5) vs model (128, 192)" in msg


def test_check_state_dict_ok_and_missing_files(tmp_path):
    a = {"w": torch.zeros(2)}
    check_state_dict(a, {"w": torch.ones(2)})
    with pytest.raises(FileNotFoundError, match="config.json"):
        T3DModel.from_pretrained(tmp_path)


def test_files_and_folders_get_the_umask_modes(tiny_model, tmp_path):
    """0644 files and 0755 folders under umask 022, like any other tool's output (not 0600)."""
    import stat

    old = os.umask(0o022)
    try:
        tiny_model.save_pretrained(tmp_path / "ck")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "ck", *(tmp_path / "ck").rglob("*")]}
    assert "ck/model.safetensors" in modes and "ck/text_encoder/tokenizer.json" in modes
    assert not [p for p in modes if "/." in p], "temp files left behind"
    wrong = {p: oct(m) for p, m in modes.items()
             if m != (0o755 if (tmp_path / p).is_dir() else 0o644)}
    assert not wrong, wrong
