import pytest
import torch
from t3d_models import SwinUNETRBackbone, check_crop_size


def test_crop_size_error_names_dimension():
    with pytest.raises(ValueError) as err:
        check_crop_size((80, 96, 96))
    assert str(err.value) == (
        "crop size (80, 96, 96) must be a multiple of 32 in every dimension; got 80 in dim 0"
    )


def test_backbone_rejects_bad_input_before_running(tiny_model):
    with pytest.raises(ValueError, match="got 48 in dim 2"):
        tiny_model.vision.encode(torch.rand(1, 1, 64, 64, 48))


def test_tiny_feature_shapes(tiny_model):
    bb = tiny_model.vision
    f = 12
    with torch.no_grad():
        feats = bb.encode(torch.rand(2, 1, 64, 64, 64))
        tokens, grid = bb.tokens(feats)
    assert [tuple(h.shape) for h in feats.hidden_states] == [
        (2, f, 32, 32, 32), (2, 2 * f, 16, 16, 16), (2, 4 * f, 8, 8, 8),
        (2, 8 * f, 4, 4, 4), (2, 16 * f, 2, 2, 2)]
    assert tuple(feats.enc0.shape) == (2, f, 64, 64, 64)
    assert tuple(feats.enc3.shape) == (2, 4 * f, 8, 8, 8)
    assert tuple(feats.dec4.shape) == (2, 16 * f, 2, 2, 2)
    assert grid == (2, 2, 2) and tuple(tokens.shape) == (2, 8, 16 * f)
    assert tuple(bb.pool(feats).shape) == (2, 16 * f)
    assert torch.allclose(bb.pool(feats), tokens.mean(1), atol=1e-6)


@pytest.mark.parametrize(("stage", "channels", "side"), [(3, 96, 4), (2, 48, 8)])
def test_token_stage_option(stage, channels, side):
    torch.manual_seed(0)
    bb = SwinUNETRBackbone(feature_size=12, window_size=4, token_stage=stage).eval()
    with torch.no_grad():
        feats = bb.encode(torch.rand(1, 1, 64, 64, 64))
        tokens, grid = bb.tokens(feats)
        assert bb.token_channels == channels
        assert tuple(tokens.shape) == (1, side**3, channels) and grid == (side,) * 3
        # tokens <-> feature map is an exact reshape, so restore() gets the map back
        fmap = tokens.transpose(1, 2).reshape(1, channels, *grid)
        assert torch.equal(fmap, bb.token_map(feats))
        restored = bb.restore(feats, tokens, grid)
        assert restored.shape == (1, 1, 64, 64, 64)


def test_restoration_false_drops_decoder():
    bb = SwinUNETRBackbone(feature_size=12, window_size=4, restoration=False)
    keys = bb.state_dict().keys()
    assert not any(k.startswith(("swin.decoder", "swin.out.")) for k in keys)
    with pytest.raises(RuntimeError, match="restoration=False"):
        bb.restore(bb.encode(torch.rand(1, 1, 64, 64, 64)))


def test_base_vision_forward_at_64():
    torch.manual_seed(0)
    bb = SwinUNETRBackbone(feature_size=48, window_size=7).eval()
    with torch.no_grad():
        feats = bb.encode(torch.rand(1, 1, 64, 64, 64), skips=False)
        tokens, _ = bb.tokens(feats)
    assert tuple(tokens.shape) == (1, 8, 768)
