"""Model cards, loading by hub id (offline) and push_to_hub (HfApi monkeypatched)."""

import os
import shutil

import pytest
from huggingface_hub import ModelCard
from t3d_models import T3DModel, T3DModelConfig, push_to_hub, write_model_card
from t3d_models.card import model_card


def test_card_is_written_with_front_matter_preset_and_preprocessing(tiny_ckpt):
    card = ModelCard.load(tiny_ckpt / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "t3d-models" and data["license"] == "apache-2.0"
    assert {"medical-imaging", "ct", "vision-language"} <= set(data["tags"])
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["t3d"]["preset"] == "t3d-tiny-cpu"
    assert data["t3d"]["preprocessing"] == {
        "crop_size": [64, 64, 64], "hu_window": [-1000.0, 1000.0], "pad_value": -1024,
        "orientation": "RAS", "spacing": "native", "intensity": "hu_window_linear"}
    text = card.text
    assert "# t3d-tiny-cpu" in text and "| preset / name | `t3d-tiny-cpu` |" in text
    for row in ("| `crop_size` | 64×64×64 |", "| `hu_window` | [-1000, 1000] |",
                "| `pad_value` | -1024 |", "| `orientation` | RAS |", "| `spacing` | native |"):
        assert row in text, row
    assert "Not for clinical use" in text and "## Limits" in text
    assert "Not recorded" in text and "None measured" in text  # no facts were passed
    assert "parameters | total 27." in text  # counted from the model


def test_card_facts_are_rendered_and_bad_fields_refused(tiny_model, tmp_path):
    cfg = T3DModelConfig.from_preset("t3d-tiny-cpu", preprocessing={"hu_window": (-200, 300)})
    text = model_card(cfg, {"steps": 120, "data": "/data/store (96 studies)",
                            "command": ["accelerate", "launch", "tools/pretrain.py", "--config", "x.yaml"],
                            "metrics": {"tcl_loss": 1.5, "tir_loss": 0.25},
                            "chance": {"tcl_loss": ("log(7)", 1.9459)}})
    assert "- steps: 120" in text and "/data/store (96 studies)" in text
    assert "| tcl_loss | 1.5000 | log(7) = 1.9459 |" in text and "| tir_loss | 0.2500 |  |" in text
    assert text.count("accelerate launch tools/pretrain.py --config x.yaml") == 2  # + "Measured by"
    assert "| `hu_window` | [-200, 300] |" in text and "steps: 120" in text.split("---")[1]
    with pytest.raises(ValueError, match=r"card field 'step'.*valid fields: steps, data"):
        tiny_model.save_pretrained(tmp_path / "ck", card={"step": 3})
    assert not (tmp_path / "ck").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="card field 'steps'"):
        model_card(cfg, {"steps": "many"})


def test_saving_twice_replaces_the_card_atomically(tiny_model, tiny_ckpt, tmp_path, monkeypatch):
    path = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, path)
    write_model_card(path, card={"steps": 7})
    assert "- steps: 7" in (path / "README.md").read_text(encoding="utf-8")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("README.md"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_model_card(path, card={"steps": 9})
    monkeypatch.undo()
    text = (path / "README.md").read_text(encoding="utf-8")
    assert "- steps: 7" in text and "- steps: 9" not in text  # the old card, whole
    assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors",
                                        "text_encoder"]  # no temp file left
    with pytest.raises(FileNotFoundError, match="no config.json"):
        write_model_card(tmp_path)


def test_folder_without_card_loads_and_hub_cache_resolves_offline(tiny_ckpt, tmp_path):
    """An old folder (no README.md) loads; so does a hub id whose snapshot is in the cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--my-lab--t3d-tiny" / "snapshots" / commit
    shutil.copytree(tiny_ckpt, snap)
    (snap / "README.md").unlink()
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text(commit, encoding="utf-8")
    from t3d_models.hub import resolve_model_folder

    assert resolve_model_folder("my-lab/t3d-tiny", cache_dir=tmp_path / "hub") == snap
    model = T3DModel.from_pretrained("my-lab/t3d-tiny", cache_dir=tmp_path / "hub")
    assert model.config.name == "t3d-tiny-cpu"
    assert model.config.preprocessing_record()["crop_size"] == [64, 64, 64]


def test_unknown_hub_id_offline_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        T3DModel.from_pretrained("no-such-lab/t3d-nothing", cache_dir=tmp_path)
    msg = str(err.value)
    assert "'no-such-lab/t3d-nothing'" in msg and "not in the Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "save_pretrained" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="not a model folder, and not a Hugging Face repo id"):
        T3DModel.from_pretrained(str(tmp_path / "missing" / "run" / "model"))


def test_push_to_hub_uploads_the_folder(tiny_ckpt, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    folder = tmp_path / "old"
    shutil.copytree(tiny_ckpt, folder)
    (folder / "README.md").unlink()  # written before cards existed: the card is added
    assert push_to_hub(folder, "my-lab/t3d-tiny", private=True, token="tok") == "commit-info"
    assert (folder / "README.md").is_file()
    assert calls[0] == ("init", "tok")
    assert calls[1] == ("create_repo", "my-lab/t3d-tiny",
                        {"repo_type": "model", "private": True, "exist_ok": True})
    kw = calls[2][1]
    assert kw["repo_id"] == "my-lab/t3d-tiny" and kw["folder_path"] == str(folder)
    assert kw["repo_type"] == "model" and ".*" in kw["ignore_patterns"]
    with pytest.raises(ValueError, match="not a Hub repo id"):
        push_to_hub(folder, "a/b/c")
    with pytest.raises(FileNotFoundError, match="no config.json or model.safetensors"):
        push_to_hub(tmp_path, "my-lab/t3d-tiny")
    assert len(calls) == 3  # nothing uploaded for bad input


def test_model_push_to_hub_saves_then_uploads(tiny_model, monkeypatch):
    import huggingface_hub

    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            pass

        def upload_folder(self, folder_path, **kw):
            seen["files"] = sorted(os.listdir(folder_path))
            seen["card"] = open(os.path.join(folder_path, "README.md"), encoding="utf-8").read()
            return kw["repo_id"]

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    with pytest.raises(ValueError, match="not a Hub repo id"):
        tiny_model.push_to_hub("bad--id")  # refused before the save
    assert tiny_model.push_to_hub("my-lab/t3d-tiny", card={"steps": 11}) == "my-lab/t3d-tiny"
    assert seen["files"] == ["README.md", "config.json", "model.safetensors", "text_encoder"]
    assert "- steps: 11" in seen["card"]


def test_card_names_the_report_languages():
    cfg = T3DModelConfig.from_preset("t3d-base-mbert")
    text = model_card(cfg, {"steps": 5, "data": "bimcv-r store", "languages": ["es", "en"]})
    card = ModelCard(text)
    assert card.data.to_dict()["language"] == ["es", "en"]
    assert "- report language(s): `es`, `en`" in card.text
    assert "google-bert/bert-base-multilingual-cased" in card.text
    assert "- report language(s): not recorded" in model_card(cfg, {"steps": 5})
