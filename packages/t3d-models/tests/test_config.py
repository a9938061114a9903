import json
import subprocess
import sys

import pytest
from pydantic import ValidationError
from t3d_models import T3DModelConfig, VisionConfig, list_presets, load_preset


def test_list_presets_does_not_import_monai_or_transformers():
    code = (
        "import sys, t3d_models as tm; names = tm.list_presets(); "
        "tm.T3DModelConfig.from_preset(names[0]); "
        "print(sorted(names), 'monai' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", check=True)
    assert out.stdout.strip() == "['t3d-base', 't3d-base-mbert', 't3d-tiny-cpu'] False False"


def test_tiny_preset_contents():
    cfg = T3DModelConfig.from_preset("t3d-tiny-cpu")
    assert cfg.vision.feature_size == 12
    assert cfg.vision.window_size == 4
    assert cfg.vision.crop_size == (64, 64, 64)
    assert cfg.text.model_name_or_path == "minilm"
    assert cfg.interactor.width == 16 * cfg.vision.feature_size


def test_base_preset_contents():
    cfg = T3DModelConfig.from_preset("t3d-base")
    assert cfg.vision.feature_size == 48
    assert cfg.vision.window_size == 7
    assert cfg.vision.crop_size == (96, 96, 96)
    assert cfg.text.model_name_or_path == "StanfordAIMI/RadBERT"
    assert cfg.embed_dim == 256


def test_multilingual_preset_is_t3d_base_with_a_multilingual_encoder():
    base, mbert = load_preset("t3d-base"), load_preset("t3d-base-mbert")
    assert mbert["text"]["model_name_or_path"] == "google-bert/bert-base-multilingual-cased"
    for d in (base, mbert):
        d.pop("name"), d["text"].pop("model_name_or_path")
    assert mbert == base  # only the text encoder differs


def test_presets_round_trip_through_json():
    for name in list_presets():
        cfg = T3DModelConfig.from_preset(name)
        assert T3DModelConfig.model_validate_json(cfg.to_json()) == cfg
        assert cfg.name == name


def test_unknown_preset_lists_names_and_suggests():
    with pytest.raises(ValueError, match=r"t3d-base.*t3d-tiny-cpu.*Did you mean 't3d-tiny-cpu'"):
        load_preset("t3d-tiny")


def test_from_preset_overrides():
    cfg = T3DModelConfig.from_preset("t3d-tiny-cpu", restoration=False, embed_dim=64)
    assert cfg.restoration is False and cfg.embed_dim == 64


def test_extra_fields_forbidden():
    data = load_preset("t3d-tiny-cpu")
    data["vision"]["img_size"] = 64
    with pytest.raises(ValidationError, match="img_size"):
        T3DModelConfig.model_validate(data)


def test_crop_size_must_be_multiple_of_32():
    with pytest.raises(ValidationError, match=r"multiple of 32 in every dimension; got 80 in dim 0"):
        VisionConfig(crop_size=(80, 96, 96))


def test_feature_size_multiple_of_12():
    with pytest.raises(ValidationError, match="multiple of 12"):
        VisionConfig(feature_size=16)


def test_interactor_heads_divide_width():
    data = json.loads(json.dumps(load_preset("t3d-tiny-cpu")))
    data["interactor"]["heads"] = 5
    with pytest.raises(ValidationError, match="divisible by heads 5"):
        T3DModelConfig.model_validate(data)
