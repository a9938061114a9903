import pytest
import torch
from t3d_models import build_monai_swinunetr, export_swinunetr, swinunetr_kwargs


@pytest.fixture(scope="module")
def x():
    return torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(3))


def _eager(model):
    """The same weights with the speed knobs off (MONAI's attention, contiguous convolutions)."""
    from t3d_models import T3DModel

    cfg = model.config
    vision = cfg.vision.model_copy(update={"attention": "eager", "channels_last": False})
    eager = T3DModel(cfg.model_copy(update={"vision": vision})).eval()
    eager.load_state_dict(model.state_dict(), strict=True)
    return eager


def _close(a, b):
    """Equal up to float rounding: the preset's channels_last_3d convolutions sum in another
    order than the plain network's (docs/performance.md, speed knobs)."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("knobs", ["eager", "preset"])
def test_export_loads_strictly_into_plain_swinunetr(tiny_model, x, knobs):
    from monai.networks.nets import SwinUNETR

    model = _eager(tiny_model) if knobs == "eager" else tiny_model
    same = torch.equal if knobs == "eager" else _close  # bit-identical without the knobs
    state = export_swinunetr(model, out_channels=1)
    net = SwinUNETR(out_channels=1, **swinunetr_kwargs(model.config)).eval()
    net.load_state_dict(state, strict=True)  # encoder + decoder + out: every key
    with torch.no_grad():
        ours = model.vision.encode(x)
        theirs = net.swinViT(x, net.normalize)
        for a, b in zip(ours.hidden_states, theirs, strict=True):
            assert same(a, b)
        assert same(ours.dec4, net.encoder10(theirs[4]))
        assert same(ours.enc0, net.encoder1(x))
        assert same(model.vision(x), net(x))


def test_build_from_checkpoint_reports_new_keys(tiny_model, tiny_ckpt, x):
    net, report = build_monai_swinunetr(tiny_ckpt, out_channels=3, return_report=True)
    assert report["newly_initialised"] == ["out.conv.conv.bias", "out.conv.conv.weight"]
    assert any(k.startswith("decoder5.") for k in report["loaded"])
    net.eval()
    with torch.no_grad():
        theirs = net.swinViT(x, net.normalize)
        ours = _eager(tiny_model).vision.encode(x, skips=False).hidden_states
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        assert net(x).shape == (1, 3, 64, 64, 64)


def test_encoder_only_export(tiny_model):
    state = export_swinunetr(tiny_model, out_channels=1, include_decoder=False)
    modules = {k.split(".")[0] for k in state}
    assert modules == {"swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10"}
    net, report = build_monai_swinunetr(tiny_model, out_channels=2, include_decoder=False,
                                        return_report=True)
    assert {k.split(".")[0] for k in report["newly_initialised"]} == {
        "decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "out"}


def test_save_swinunetr_folder_loads_in_plain_monai_with_its_card(tiny_model, tiny_ckpt, tmp_path):
    """The card's own recipe (plain MONAI + safetensors, no t3d_models) loads it strictly."""
    import json
    import os

    from huggingface_hub import ModelCard
    from monai.networks.nets import SwinUNETR
    from safetensors.torch import load_file
    from t3d_models import save_swinunetr

    out = save_swinunetr(tiny_ckpt, tmp_path / "seg", out_channels=3)
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert cfg["swinunetr"]["out_channels"] == 3 and cfg["swinunetr"]["feature_size"] == 12
    assert cfg["preprocessing"] == tiny_model.config.preprocessing_record()
    assert cfg["newly_initialised"] == ["out.conv.conv.bias", "out.conv.conv.weight"]
    net = SwinUNETR(**cfg["swinunetr"])
    net.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    ref = tiny_model.state_dict()
    for key, value in net.state_dict().items():
        if not key.startswith("out."):
            assert torch.equal(value, ref["vision.swin." + key]), key
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "monai" and card.data.license == "apache-2.0"
    assert card.data.to_dict()["t3d"]["preprocessing"]["hu_window"] == [-1000.0, 1000.0]
    assert "| `pad_value` | -1024 |" in card.text and "Not for clinical use" in card.text
    assert "`out`" in card.text  # the newly initialised module is named


def test_four_channel_repeat_reproduces_the_one_channel_encoder(tiny_model, x):
    """repeat: W/C per channel, so C copies of one image give the pre-trained features."""
    one = build_monai_swinunetr(tiny_model, out_channels=2).eval()
    four, report = build_monai_swinunetr(tiny_model, out_channels=2, in_channels=4,
                                         channel_adapt="repeat", return_report=True)
    four.eval()
    assert report["adapted"] == ["encoder1.layer.conv1.conv.weight",
                                 "encoder1.layer.conv3.conv.weight",
                                 "swinViT.patch_embed.proj.weight"]
    w1 = one.swinViT.patch_embed.proj.weight
    w4 = four.swinViT.patch_embed.proj.weight
    assert w4.shape == (w1.shape[0], 4, *w1.shape[2:])
    for c in range(4):
        assert torch.equal(w4[:, c], w1[:, 0] * 0.25)
    x4 = x.repeat(1, 4, 1, 1, 1)
    with torch.no_grad():
        ref = one.swinViT(x, one.normalize)
        got = four.swinViT(x4, four.normalize)
        for a, b in zip(ref, got, strict=True):
            torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(four.encoder1(x4), one.encoder1(x), atol=2e-5, rtol=1e-4)
        # a different image per channel gives different features: the test can fail
        x_mixed = torch.cat([x, x.flip(2), x.flip(3), 1 - x], dim=1)
        assert not torch.allclose(four.swinViT(x_mixed, four.normalize)[4], ref[4], atol=1e-3)


def test_four_channel_average_is_the_one_channel_response_times_c(tiny_model, x):
    one = build_monai_swinunetr(tiny_model, out_channels=2).eval()
    four = build_monai_swinunetr(tiny_model, out_channels=2, in_channels=4,
                                 channel_adapt="average").eval()
    proj1, proj4 = one.swinViT.patch_embed.proj, four.swinViT.patch_embed.proj
    assert torch.equal(proj4.weight, proj1.weight.expand(-1, 4, -1, -1, -1))
    with torch.no_grad():
        bias = proj1.bias.view(1, -1, 1, 1, 1)
        torch.testing.assert_close(proj4(x.repeat(1, 4, 1, 1, 1)) - bias, 4 * (proj1(x) - bias),
                                   atol=1e-5, rtol=1e-4)


def test_unsupported_channel_adapt_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match=r"channel_adapt='zero' is not supported; choose one of "
                                         r"'repeat', 'average'"):
        build_monai_swinunetr(tiny_model, out_channels=2, in_channels=4, channel_adapt="zero")


def test_save_swinunetr_records_channels_and_the_mri_policy(tiny_model, tmp_path):
    import json

    from t3d_models import save_swinunetr

    out = save_swinunetr(tiny_model, tmp_path / "mri", out_channels=4, in_channels=4,
                         intensity="zscore_foreground")
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert cfg["swinunetr"]["in_channels"] == 4
    assert cfg["preprocessing"]["intensity"] == "zscore_foreground"
    assert cfg["channel_adapt"]["mode"] == "repeat"
    assert len(cfg["channel_adapt"]["keys"]) == 3
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| `intensity` | zscore_foreground |" in card and "`hu_window`" not in card


def test_adapt_input_channels_from_several_source_channels():
    from t3d_models import adapt_input_channels

    w = torch.randn(5, 2, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    rep = adapt_input_channels(w, 3, "repeat")
    assert torch.equal(rep, torch.stack([w[:, 0], w[:, 1], w[:, 0]], dim=1) * (2 / 3))
    avg = adapt_input_channels(w, 3, "average")
    assert torch.equal(avg, w.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1, -1))
    # 2 -> 2 with repeat is the identity
    assert torch.equal(adapt_input_channels(w, 2, "repeat"), w)
