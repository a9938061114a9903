"""ReportGenerator: shapes, token positions, encoder freezing, image conditioning (the loss of a
two-study batch depends on which image is given), decoding, save/load."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from t3d_models.config import VisionConfig
from t3d_models.report import (
    DecoderConfig,
    ReportGenerator,
    ReportGeneratorConfig,
    ResamplerConfig,
    crop_token_positions,
    pad_studies,
)

REPORTS = ["FINDINGS: The heart is enlarged. Small right pleural effusion.",
           "FINDINGS: No pleural effusion. A 12 mm nodule in the left lung."]


def _config(tokenizer="words", encoder="frozen", **dec):
    return ReportGeneratorConfig(
        vision=VisionConfig(feature_size=12, window_size=4, crop_size=(64, 64, 64)),
        encoder=encoder,
        resampler=ResamplerConfig(num_queries=4, depth=1, heads=2, dropout=0.0),
        decoder=DecoderConfig(tokenizer=tokenizer, config={"n_layer": 1, "n_embd": 32,
                                                            "n_head": 2, "n_positions": 128,
                                                            **dec}))


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    return ReportGenerator(_config(), reports=REPORTS)


@pytest.fixture(scope="module")
def studies(gen):
    """Two studies: one of two 64³ crops (a 96x64x64 volume, dark), one of one crop (bright)."""
    g = torch.Generator().manual_seed(3)
    vol0 = 0.2 * torch.rand(2, 1, 64, 64, 64, generator=g)
    vol1 = 0.8 + 0.2 * torch.rand(1, 1, 64, 64, 64, generator=g)
    t0, p0 = gen.study_tokens(vol0, [(0, 0, 0), (32, 0, 0)], (96, 64, 64))
    t1, p1 = gen.study_tokens(vol1, [(0, 0, 0)], (64, 64, 64))
    return [(t0, p0), (t1, p1)]


def test_shapes_positions_and_padding(gen, studies):
    (t0, p0), (t1, p1) = studies
    assert t0.shape == (16, 192) and t1.shape == (8, 192)  # 2x2x2 bottleneck tokens per crop
    # token centres, as fractions of the volume: x of crop 0 at 16/96 and 48/96, crop 1 at 48, 80
    assert sorted(set(p0[:, 0].tolist())) == pytest.approx([16 / 96, 48 / 96, 80 / 96])
    assert p0[:8, 0].tolist() == pytest.approx([16 / 96] * 4 + [48 / 96] * 4)
    assert p1[:, 2].tolist() == pytest.approx([0.25, 0.75] * 4)
    assert crop_token_positions((0, 0, 0), (64, 64, 64), (2, 2, 2), (64, 64, 64)).shape == (8, 3)
    tokens, pos, mask = pad_studies([t0, t1], [p0, p1])
    assert tokens.shape == (2, 16, 192) and pos.shape == (2, 16, 3)
    assert mask.sum(1).tolist() == [16, 8] and not tokens[1, 8:].any()
    hidden = gen.decoder.get_input_embeddings().embedding_dim
    assert gen.prefix(tokens, pos, mask).shape == (2, 4, hidden)
    ids = gen.tokenize_reports(REPORTS)
    assert ids["input_ids"][:, 0].tolist() == [gen.bos_id] * 2
    out = gen(tokens, pos, mask, **ids)
    assert out["logits"].shape == (2, 4 + ids["input_ids"].shape[1], len(gen.tokenizer))
    assert torch.isfinite(out["loss"])


def test_frozen_encoder_gets_no_gradients_and_partial_trains_the_last_stage():
    torch.manual_seed(0)
    g = ReportGenerator(_config(), reports=REPORTS)
    toks, pos = g.study_tokens(torch.rand(1, 1, 64, 64, 64), [(0, 0, 0)], (64, 64, 64))
    tokens, p, mask = pad_studies([toks], [pos])
    g(tokens, p, mask, **g.tokenize_reports(REPORTS[:1]))["loss"].backward()
    assert all(q.grad is None for q in g.vision.parameters())
    assert all(q.grad is not None for q in g.resampler.parameters())
    partial = ReportGenerator(_config(encoder="partial"), vision=g.vision, reports=REPORTS)

    def block(name):  # swin.swinViT.layers4.* -> layers4, swin.encoder10.* -> encoder10
        parts = name.split(".")
        return parts[2] if parts[1] == "swinViT" else parts[1]

    trainable = {block(n) for n, q in partial.vision.named_parameters() if q.requires_grad}
    assert trainable == {"layers4", "encoder10"}


def _losses(model, tokens, pos, mask, ids):
    swapped = model(tokens.flip(0), pos.flip(0), mask.flip(0), **ids)["loss"].item()
    return model(tokens, pos, mask, **ids)["loss"].item(), swapped


def test_the_loss_depends_on_which_image_is_given(studies):
    """Overfit a two-study batch: with the right images the reports are cheap, with the images
    swapped they are not, and greedy decoding writes each study's own report. The reports part
    after two words, from where the text itself predicts the rest: only the first diverging
    token needs the image, so the mean token loss moves by a fraction of that token's loss. A
    generator that ignores its prefix scores both pairings exactly alike."""
    torch.manual_seed(1)
    model = ReportGenerator(_config(), reports=REPORTS).train()
    tokens, pos, mask = pad_studies([s[0] for s in studies], [s[1] for s in studies])
    ids = model.tokenize_reports(REPORTS)
    # one step: the gradient reaches the visual tokens through the prefix
    probe = tokens.clone().requires_grad_(True)
    model(probe, pos, mask, **ids)["loss"].backward()
    assert probe.grad.abs().sum() > 0
    model.zero_grad()
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=3e-3)
    for _ in range(100):
        opt.zero_grad()
        model(tokens, pos, mask, **ids)["loss"].backward()
        opt.step()
    model.eval()
    right, swapped = _losses(model, tokens, pos, mask, ids)
    assert right < 0.3 and swapped > right + 0.15, (right, swapped)
    texts = model.generate(tokens, pos, mask, max_new_tokens=40)
    norm = [" ".join(model.tokenizer.tokenize(r)) for r in REPORTS]
    assert [" ".join(model.tokenizer.tokenize(t)) for t in texts] == norm
    # the same measurement with the image cut off: no difference at all
    real = model.prefix
    model.prefix = lambda t, p, m: torch.zeros_like(real(t, p, m))
    try:
        cut_right, cut_swapped = _losses(model, tokens, pos, mask, ids)
    finally:
        model.prefix = real
    assert cut_right == pytest.approx(cut_swapped, abs=1e-6)


def test_decoding_options_and_training_flags(gen, studies):
    tokens, pos, mask = pad_studies([s[0] for s in studies], [s[1] for s in studies])
    gen.train()
    greedy = gen.generate(tokens, pos, mask, max_new_tokens=5)
    beam = gen.generate(tokens, pos, mask, max_new_tokens=5, num_beams=3, repetition_penalty=1.3)
    assert len(greedy) == len(beam) == 2 and all(isinstance(t, str) for t in greedy + beam)
    assert all(len(gen.tokenizer.tokenize(t)) <= 5 for t in greedy)
    assert gen.training and gen.resampler.training  # flags restored


def test_save_and_load_round_trip(tmp_path, gen, studies):
    tokens, pos, mask = pad_studies([s[0] for s in studies], [s[1] for s in studies])
    gen.resampler.fit_location_stats([s[0] for s in studies], [s[1] for s in studies])
    gen.save_pretrained(tmp_path / "model", card={"steps": 3})
    assert {p.name for p in (tmp_path / "model").iterdir()} == {
        "report_config.json", "model.safetensors", "decoder", "README.md"}
    back = ReportGenerator.from_pretrained(tmp_path / "model")
    gen.eval()
    back.eval()
    ids = gen.tokenize_reports(REPORTS)
    assert back.tokenizer.get_vocab() == gen.tokenizer.get_vocab()
    assert bool(back.resampler.location_fitted)  # the location statistics travel with the weights
    assert torch.equal(back.resampler.location_mean, gen.resampler.location_mean)
    assert back(tokens, pos, mask, **ids)["loss"].item() == pytest.approx(
        gen(tokens, pos, mask, **ids)["loss"].item(), abs=1e-6)
    assert back.generate(tokens, pos, mask, max_new_tokens=6) == \
        gen.generate(tokens, pos, mask, max_new_tokens=6)
    with pytest.raises(ValueError, match="no report_config.json"):
        ReportGenerator.from_pretrained(tmp_path)


def test_decoder_config_errors():
    with pytest.raises(ValidationError, match="needs decoder.tokenizer"):
        DecoderConfig(model_name_or_path=None, tokenizer=None)
    cfg = _config().model_copy(update={"decoder": DecoderConfig(
        model_name_or_path="/no/such/decoder", tokenizer="minilm")})
    with pytest.raises(ValueError, match="generator.decoder.model_name_or_path: cannot find"):
        ReportGenerator(cfg)


def test_location_statistics_match_a_naive_per_cell_loop():
    """Per-cell mean/std of the tokens whose centre falls in each G³ cell; cells with too few
    tokens use the statistics over all tokens; unfitted (or grid 0) is the identity."""
    from t3d_models.report import VisualResampler

    torch.manual_seed(0)
    res = VisualResampler(5, 16, ResamplerConfig(num_queries=2, depth=1, heads=2, location_grid=2))
    toks = [torch.randn(6, 5) * 3 + 1, torch.randn(4, 5)]
    pos = [torch.tensor([[0.1, 0.1, 0.1]] * 3 + [[0.9, 0.1, 0.6]] * 3),
           torch.tensor([[0.2, 0.3, 0.4], [0.7, 0.2, 0.9], [0.6, 0.1, 0.8], [0.99, 0.9, 0.9]])]
    x, p = torch.cat(toks), torch.cat(pos)
    assert torch.equal(res.standardise(x, p), x)  # not fitted yet
    info = res.fit_location_stats(toks, pos)
    cells = [int(i) * 4 + int(j) * 2 + int(k) for i, j, k in (p >= 0.5).long().tolist()]
    assert info == {"cells": 2, "tokens": 10}  # cell 0 (4 tokens) and cell 5 (5 tokens)
    for c in range(8):
        rows = x[[i for i, cc in enumerate(cells) if cc == c]]
        mean, std = (rows.mean(0), rows.std(0, unbiased=False)) if len(rows) >= 2 else \
            (x.mean(0), x.std(0, unbiased=False))
        assert torch.allclose(res.location_mean[c], mean, atol=1e-5), c
        assert torch.allclose(res.location_std[c], std, atol=1e-5), c
    z = res.standardise(x, p)
    for c in (0, 5):
        sel = [i for i, cc in enumerate(cells) if cc == c]
        assert torch.allclose(z[sel].mean(0), torch.zeros(5), atol=1e-5)
    off = VisualResampler(5, 16, ResamplerConfig(num_queries=2, depth=1, heads=2, location_grid=0))
    assert off.fit_location_stats(toks, pos) == {"cells": 0, "tokens": 0}
    assert torch.equal(off.standardise(x, p), x)


def test_finding_head_loss_is_the_weighted_binary_cross_entropy(studies):
    torch.manual_seed(0)
    cfg = _config().model_copy(update={"findings": ["cardiomegaly", "pleural_effusion", "nodule"],
                                       "finding_loss_weight": 0.5})
    model = ReportGenerator(cfg, reports=REPORTS).eval()
    tokens, pos, mask = pad_studies([s[0] for s in studies], [s[1] for s in studies])
    ids = model.tokenize_reports(REPORTS)
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = model(tokens, pos, mask, **ids, finding_labels=labels)
    logits = out["finding_logits"]
    assert logits.shape == (2, 3)
    p = torch.sigmoid(logits)
    naive = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    assert out["finding_loss"].item() == pytest.approx(naive.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["lm_loss"].item() + 0.5 * naive.item(), rel=1e-5)
    plain = model(tokens, pos, mask, **ids)
    assert plain["loss"].item() == pytest.approx(out["lm_loss"].item()) and "finding_loss" not in plain
    assert torch.allclose(model.predict_findings(tokens, pos, mask), p, atol=1e-6)
    # the finding loss reaches the resampler (the prefix), not only the head
    model.zero_grad()
    model(tokens, pos, mask, **ids, finding_labels=labels)["finding_loss"].backward()
    assert model.resampler.queries.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="finding_labels"):
        model(tokens, pos, mask, **ids, finding_labels=labels[:, :2])
    with pytest.raises(ValueError, match="no finding head"):
        ReportGenerator(_config(), reports=REPORTS).finding_logits(torch.zeros(1, 4, 32))
