import pytest
import torch
from t3d_models import T3DModel

BASE_KEYS = {"visual_emb", "text_informed_emb", "crop_group", "volume_emb", "text_emb", "group"}
TIR_KEYS = {"restored", "target", "corruption_mask"}


def plain(batch):
    """The batch without the TIR inputs."""
    return {k: v for k, v in batch.items() if k not in ("corrupted", "corruption_mask")}


def _run(model, batch):
    with torch.no_grad():
        return model(**batch)


def test_output_keys_and_shapes(tiny_model, tiny_batch, tiny_out, tiny_plain_out):
    out, _ = tiny_out
    assert set(out) == BASE_KEYS | TIR_KEYS
    e = tiny_model.config.embed_dim
    assert out["visual_emb"].shape == out["text_informed_emb"].shape == (3, e)
    assert out["volume_emb"].shape == out["text_emb"].shape == (2, e)
    assert out["crop_group"].tolist() == [0, 0, 1] and out["group"].tolist() == [0, 1]
    for k in TIR_KEYS:
        assert out[k].shape == (3, 1, 64, 64, 64), k
    assert out["target"] is tiny_batch["crops"]
    assert out["corruption_mask"] is tiny_batch["corruption_mask"]
    assert torch.allclose(out["volume_emb"][0], out["visual_emb"][:2].mean(0), atol=1e-6)
    assert torch.equal(out["volume_emb"][1], out["visual_emb"][2])
    assert set(tiny_plain_out) == BASE_KEYS
    # text embeddings do not depend on the crops or the corruption
    assert torch.equal(out["text_emb"], tiny_plain_out["text_emb"])


def test_encoder_sees_corrupted_then_clean_crops(tiny_out, tiny_batch):
    # default contrastive_input="clean": restoration from the corrupted crops, embeddings from
    # the clean ones (a second, skip-less encoder pass)
    _, seen = tiny_out
    assert len(seen) == 2
    assert torch.equal(seen[0], tiny_batch["corrupted"]) and torch.equal(seen[1], tiny_batch["crops"])


def test_contrastive_input_selects_the_embedded_crops(tiny_model, tiny_batch, tiny_out):
    out, _ = tiny_out
    with torch.no_grad():
        clean = tiny_model.encode_volume_crops(tiny_batch["crops"])
        corrupted = tiny_model.encode_volume_crops(tiny_batch["corrupted"])
    torch.testing.assert_close(out["visual_emb"], clean, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out["visual_emb"], corrupted, atol=1e-3)
    tiny_model.config.contrastive_input = "corrupted"
    seen = []
    hook = tiny_model.vision.swin.swinViT.register_forward_hook(
        lambda mod, args, o: seen.append(args[0]))
    try:
        with torch.no_grad():
            shared = tiny_model(**tiny_batch)
    finally:
        hook.remove()
        tiny_model.config.contrastive_input = "clean"
    assert len(seen) == 1 and torch.equal(seen[0], tiny_batch["corrupted"])
    torch.testing.assert_close(shared["visual_emb"], corrupted, rtol=1e-4, atol=1e-5)
    # the restoration is the same either way
    torch.testing.assert_close(shared["restored"], out["restored"])


def test_padding_changes_nothing(tiny_model, tiny_batch, tiny_plain_out):
    b = plain(tiny_batch)
    pad_id = tiny_model.text.tokenizer.pad_token_id
    extra = 9
    b["input_ids"] = torch.cat(
        [b["input_ids"], torch.full((2, extra), pad_id, dtype=torch.long)], 1)
    b["attention_mask"] = torch.cat(
        [b["attention_mask"], torch.zeros(2, extra, dtype=torch.long)], 1)
    padded = _run(tiny_model, b)
    for k in ("text_emb", "text_informed_emb", "visual_emb", "volume_emb"):
        assert torch.allclose(tiny_plain_out[k], padded[k], atol=1e-5), k


def test_text_changes_text_informed_only(tiny_model, tiny_batch, tiny_out):
    ref, _ = tiny_out
    b = dict(tiny_batch)
    b.update(tiny_model.tokenize(["Completely different text about the liver.", "Normal."]))
    other = _run(tiny_model, b)
    assert torch.equal(ref["visual_emb"], other["visual_emb"])
    assert not torch.allclose(ref["text_informed_emb"], other["text_informed_emb"])
    assert not torch.allclose(ref["restored"], other["restored"])


def test_crops_attend_to_their_own_study(tiny_model, tiny_batch, tiny_plain_out):
    b = plain(tiny_batch)
    # swap the two reports and the crop->study mapping: every crop still sees its own report
    b["input_ids"] = tiny_batch["input_ids"].flip(0)
    b["attention_mask"] = tiny_batch["attention_mask"].flip(0)
    b["study_index"] = 1 - tiny_batch["study_index"]
    b["group"] = tiny_batch["group"].flip(0)
    swapped = _run(tiny_model, b)
    assert torch.allclose(tiny_plain_out["text_informed_emb"], swapped["text_informed_emb"],
                          atol=1e-5)
    assert torch.equal(tiny_plain_out["crop_group"], swapped["crop_group"])


def test_eval_helpers_match_forward(tiny_model, tiny_batch, tiny_plain_out, reports):
    out = tiny_plain_out
    with torch.no_grad():
        per_crop = tiny_model.encode_volume_crops(tiny_batch["crops"], batch_size=2)
        per_study = tiny_model.encode_volume_crops(tiny_batch["crops"], tiny_batch["study_index"])
    assert torch.allclose(per_crop, out["visual_emb"], atol=1e-5)
    assert torch.allclose(per_study, out["volume_emb"], atol=1e-5)
    with torch.no_grad():
        text = tiny_model.encode_text({"input_ids": tiny_batch["input_ids"],
                                       "attention_mask": tiny_batch["attention_mask"]})
        from_str = tiny_model.encode_text(reports)
    assert torch.allclose(text, out["text_emb"], atol=1e-6)
    assert torch.allclose(from_str, out["text_emb"], atol=1e-6)


def test_bad_inputs(tiny_model, tiny_batch):
    b = plain(tiny_batch)
    b["study_index"] = torch.tensor([0, 0, 0])
    with pytest.raises(ValueError, match=r"studies \[1\] have no crops"):
        _run(tiny_model, b)
    b = plain(tiny_batch)
    b["group"] = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="group must be"):
        _run(tiny_model, b)
    b = plain(tiny_batch)
    b["crops"] = torch.rand(3, 1, 64, 80, 64)
    with pytest.raises(ValueError, match="got 80 in dim 1"):
        _run(tiny_model, b)
    b = dict(tiny_batch)
    b["corrupted"] = b["corrupted"][:2]
    with pytest.raises(ValueError, match="corrupted .* must match crops"):
        _run(tiny_model, b)


def test_restoration_false_ablation(tiny_batch):
    torch.manual_seed(0)
    model = T3DModel.from_preset("t3d-tiny-cpu", restoration=False).eval()
    assert not hasattr(model.vision.swin, "decoder5")
    b = dict(tiny_batch, crops=tiny_batch["crops"][:2], corrupted=tiny_batch["corrupted"][:2],
             corruption_mask=None, study_index=torch.tensor([0, 1]))
    with pytest.warns(UserWarning, match="ignoring `corrupted`"):
        out = _run(model, b)
    assert set(out) == BASE_KEYS


def test_train_step_gives_grads_everywhere(tiny_model, tiny_batch):
    model = T3DModel(tiny_model.config, text_source=tiny_model.text.name_or_path).train()
    model.load_state_dict(tiny_model.state_dict())
    # two crops of one study: the BatchNorm heads need >= 2 rows in training mode
    b = dict(tiny_batch, crops=tiny_batch["crops"][:2], corrupted=tiny_batch["corrupted"][:2],
             corruption_mask=None, study_index=torch.tensor([0, 0]), group=torch.tensor([0]),
             input_ids=tiny_batch["input_ids"][:1], attention_mask=tiny_batch["attention_mask"][:1])
    out = model(**b)
    assert out["corruption_mask"].shape == (2, 1, 64, 64, 64)
    loss = sum(v.float().mean() for v in out.values() if v.is_floating_point())
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_base_preset_offline_fails_fast_with_fix():
    with pytest.raises(OSError, match=r"StanfordAIMI/RadBERT.*t3d-models\[minilm\]"):
        T3DModel.from_preset("t3d-base")
