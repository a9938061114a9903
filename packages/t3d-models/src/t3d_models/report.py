"""Report generation from a T3D visual encoder: crop tokens → learned queries → a causal LM.

:class:`ReportGenerator` takes the visual tokens of every sliding-window crop of a study (the
SwinUNETR bottleneck tokens of :class:`~t3d_models.vision.SwinUNETRBackbone`, at native
resolution, each tagged with its position in the volume), resamples them with a small set of
learned queries (a Perceiver-resampler / Q-Former-style cross-attention stack) into a visual
prefix of ``num_queries`` vectors in the decoder's embedding space, and decodes the report with
any Hugging Face causal language model (``AutoModelForCausalLM``) conditioned on that prefix
(the prefix is prepended to the token embeddings: ``inputs_embeds``). Greedy and beam decoding
are transformers' ``generate``.

The decoder is named by hub id or folder and loaded with its weights when they are available;
otherwise (offline, or ``pretrained: false``) it is built from its config with random weights.
A decoder given only as ``model_type`` + ``config`` (e.g. a 2-layer GPT-2) is always built
randomly; its tokenizer is then ``decoder.tokenizer`` (``"minilm"``: the packaged
all-MiniLM-L6-v2 WordPiece tokenizer, for offline use).

Importing this module never imports MONAI or transformers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .config import PreprocessingConfig, VisionConfig

__all__ = [
    "DecoderConfig",
    "ReportGenerator",
    "ReportGeneratorConfig",
    "ResamplerConfig",
    "VisualResampler",
    "crop_token_positions",
    "pad_studies",
]

log = logging.getLogger("t3d.report")

CONFIG_NAME = "report_config.json"
WEIGHTS_NAME = "model.safetensors"
DECODER_DIR = "decoder"
ENCODER_MODES = ("frozen", "partial", "trainable")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DecoderConfig(_Strict):
    """The causal language model that writes the report.

    Attributes:
        model_name_or_path: hub id (``distilgpt2``, ``microsoft/biogpt``, a Llama-style model) or
            a folder; ``None`` builds ``model_type`` from ``config`` with random weights.
        model_type: transformers model type used when ``model_name_or_path`` is ``None``.
        config: overrides applied to the decoder's config (e.g. ``{"n_layer": 2}``).
        pretrained: load the weights of ``model_name_or_path`` when available; when they cannot
            be loaded (offline, no weights in the folder) the decoder is built from its config
            with random weights and a warning says so.
        tokenizer: tokenizer hub id / folder; ``None``: the decoder's own; ``"minilm"``: the
            packaged all-MiniLM-L6-v2 tokenizer (works offline); ``"words"``: a word-level
            tokenizer built from the training reports (:func:`word_tokenizer`; a small output
            layer for a small domain vocabulary such as the phantom's, saved with the model).
        max_length: report tokens kept for training (longer reports are truncated).
    """

    model_name_or_path: str | None = None
    model_type: str = "gpt2"
    config: dict[str, Any] = Field(default_factory=dict)
    pretrained: bool = True
    tokenizer: str | None = None
    max_length: int = Field(256, ge=8)

    @model_validator(mode="after")
    def _needs_tokenizer(self) -> DecoderConfig:
        if self.model_name_or_path is None and self.tokenizer is None:
            raise ValueError("generator.decoder: a decoder built from model_type needs "
                             "decoder.tokenizer (e.g. minilm, or a hub id / folder)")
        return self


class ResamplerConfig(_Strict):
    """Learned queries that cross-attend to the crop tokens (the visual prefix).

    Attributes:
        num_queries: prefix length (vectors handed to the decoder).
        depth: cross-attention layers (each: query self-attention, cross-attention, MLP).
        heads: attention heads.
        width: resampler width (``None``: the decoder's hidden size).
        dropout: dropout inside the layers.
        position_frequencies: Fourier frequencies of the token position encoding (the token's
            centre as a fraction of the volume along each RAS axis), which is how left and
            right reach the decoder.
        location_grid: ``G``: tokens are standardised per location cell of a ``G x G x G``
            grid over the volume (the mean and std of the training studies' tokens whose centre
            falls in that cell, fitted once by :meth:`VisualResampler.fit_location_stats` and
            saved with the weights). A frozen encoder's tokens are dominated by *where* in the
            body they are; what differs between studies (the findings) is a small deviation
            from the average token at that place, which this makes visible. 0: no location
            standardisation (a LayerNorm per token only).
    """

    num_queries: int = Field(16, ge=1)
    depth: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    width: int | None = Field(None, ge=8)
    dropout: float = Field(0.1, ge=0, lt=1)
    position_frequencies: int = Field(4, ge=1)
    location_grid: int = Field(4, ge=0, le=16)


class ReportGeneratorConfig(_Strict):
    """Everything needed to rebuild a :class:`ReportGenerator` (saved as ``report_config.json``).

    Attributes:
        vision: the T3D vision tower (copied from the encoder checkpoint).
        preprocessing: the encoder's preprocessing record (HU window, padding).
        encoder: ``frozen`` (no encoder gradients; tokens can be cached), ``partial`` (the last
            ``trainable_stages`` Swin stages and the bottleneck block train) or ``trainable``.
        trainable_stages: Swin stages trained in ``partial`` mode (1-4, from the deepest).
        resampler: :class:`ResamplerConfig`.
        decoder: :class:`DecoderConfig`.
        overlap: sliding-window overlap of the crops that cover a study.
        encoder_source: where the encoder weights came from (a checkpoint folder, or
            ``random:<preset>``), for the model card and results.
        findings: names of the findings an auxiliary head predicts from the visual prefix
            (multi-label, binary cross-entropy against labels read from the training reports);
            empty: no head. The head makes the prefix carry what the report must state, so the
            decoder has something image-specific to read (see docs/report_generation.md).
        finding_loss_weight: weight of that loss next to the token cross-entropy.
    """

    vision: VisionConfig
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)
    encoder: Literal["frozen", "partial", "trainable"] = "frozen"
    trainable_stages: int = Field(1, ge=1, le=4)
    resampler: ResamplerConfig = Field(default_factory=ResamplerConfig)
    decoder: DecoderConfig
    overlap: float = Field(0.25, ge=0, lt=1)
    encoder_source: str = ""
    findings: list[str] = Field(default_factory=list)
    finding_loss_weight: float = Field(1.0, ge=0)


def crop_token_positions(start: tuple[int, int, int], crop_size: tuple[int, int, int],
                         grid: tuple[int, int, int], volume_shape: tuple[int, int, int]
                         ) -> torch.Tensor:
    """Centres of a crop's ``d*h*w`` tokens as fractions of the volume, ``(L, 3)`` in [0, 1].

    The order is the tokens' (``flatten(2)`` of the token map: x slowest, z fastest).
    """
    axes = []
    for s, c, g, n in zip(start, crop_size, grid, volume_shape, strict=True):
        step = c / g
        axes.append((s + (torch.arange(g, dtype=torch.float32) + 0.5) * step) / max(n, 1))
    gx, gy, gz = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten(), gz.flatten()], dim=1).clamp(0, 1)


def pad_studies(tokens: list[torch.Tensor], positions: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-study ``(T_i, C)`` tokens and ``(T_i, 3)`` positions into padded batches.

    Returns:
        ``(tokens (B, T, C), positions (B, T, 3), mask (B, T) bool: True = a real token)``.
    """
    if len(tokens) != len(positions) or not tokens:
        raise ValueError(f"need one positions tensor per study; got {len(tokens)} token and "
                         f"{len(positions)} position tensors")
    t = max(x.shape[0] for x in tokens)
    c = tokens[0].shape[1]
    out = tokens[0].new_zeros(len(tokens), t, c)
    pos = tokens[0].new_zeros(len(tokens), t, 3)
    mask = torch.zeros(len(tokens), t, dtype=torch.bool, device=tokens[0].device)
    for i, (x, p) in enumerate(zip(tokens, positions, strict=True)):
        out[i, : x.shape[0]] = x
        pos[i, : x.shape[0]] = p.to(out)
        mask[i, : x.shape[0]] = True
    return out, pos, mask


class VisualResampler(nn.Module):
    """``num_queries`` learned queries cross-attending to position-tagged visual tokens.

    Args:
        token_dim: channels of the visual tokens.
        out_dim: width of the prefix vectors (the decoder's hidden size).
        config: :class:`ResamplerConfig`.
    """

    def __init__(self, token_dim: int, out_dim: int, config: ResamplerConfig) -> None:
        super().__init__()
        width = config.width or out_dim
        if width % config.heads:
            raise ValueError(f"resampler width {width} is not divisible by heads {config.heads}")
        self.frequencies = config.position_frequencies
        self.grid = config.location_grid
        cells = max(1, self.grid) ** 3
        # per-cell token statistics (identity until fitted); part of the saved state
        self.register_buffer("location_mean", torch.zeros(cells, token_dim))
        self.register_buffer("location_std", torch.ones(cells, token_dim))
        self.register_buffer("location_fitted", torch.zeros((), dtype=torch.bool))
        self.token_in = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, width))
        self.position_in = nn.Linear(6 * self.frequencies, width)
        self.queries = nn.Parameter(torch.randn(config.num_queries, width) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(width, config.heads, dim_feedforward=4 * width,
                                       dropout=config.dropout, batch_first=True, norm_first=True)
            for _ in range(config.depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))

    def location_cells(self, positions: torch.Tensor) -> torch.Tensor:
        """Flat index of the ``G x G x G`` cell of each position in [0, 1]³ (``(...,)`` long)."""
        g = max(1, self.grid)
        ijk = (positions * g).long().clamp(0, g - 1)
        return (ijk[..., 0] * g + ijk[..., 1]) * g + ijk[..., 2]

    @torch.no_grad()
    def fit_location_stats(self, tokens: list[torch.Tensor], positions: list[torch.Tensor],
                           min_count: int = 2) -> dict[str, int]:
        """Fit the per-cell mean and std from studies' ``(T_i, C)`` tokens and ``(T_i, 3)``
        positions (the training studies). A cell with fewer than ``min_count`` tokens uses the
        statistics over all tokens. No-op when ``location_grid`` is 0.

        Returns:
            ``{"cells": cells with their own statistics, "tokens": tokens used}``.
        """
        if self.grid == 0:
            return {"cells": 0, "tokens": 0}
        if not tokens:
            raise ValueError("fit_location_stats needs the tokens of at least one study")
        x = torch.cat([t.detach().float().cpu() for t in tokens])
        cell = self.location_cells(torch.cat([p.detach().float().cpu() for p in positions]))
        n = self.location_mean.shape[0]
        count = torch.bincount(cell, minlength=n).float()
        total = torch.zeros(n, x.shape[1]).index_add_(0, cell, x)
        square = torch.zeros(n, x.shape[1]).index_add_(0, cell, x * x)
        mean = total / count.clamp_min(1)[:, None]
        var = (square / count.clamp_min(1)[:, None] - mean**2).clamp_min(0)
        own = count >= min_count
        g_mean, g_std = x.mean(0), x.std(0, unbiased=False)
        mean[~own] = g_mean
        std = var.sqrt()
        std[~own] = g_std
        # a channel that never varies in a cell is left unscaled rather than blown up
        std = torch.where(std > 1e-6 * (1 + g_std), std, torch.ones_like(std))
        self.location_mean.copy_(mean)
        self.location_std.copy_(std)
        self.location_fitted.fill_(True)
        return {"cells": int(own.sum()), "tokens": int(x.shape[0])}

    def standardise(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Tokens minus the mean token of their location cell, over its std (identity when
        ``location_grid`` is 0 or the statistics were never fitted)."""
        if self.grid == 0 or not bool(self.location_fitted):
            return tokens
        cell = self.location_cells(positions)
        return (tokens - self.location_mean[cell].to(tokens)) / self.location_std[cell].to(tokens)

    def position_features(self, positions: torch.Tensor) -> torch.Tensor:
        """Fourier features ``(..., 6F)`` of positions in [0, 1]³."""
        freqs = 2 ** torch.arange(self.frequencies, device=positions.device, dtype=positions.dtype)
        angles = positions.unsqueeze(-1) * freqs * math.pi  # (..., 3, F)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, C)`` tokens, ``(B, T, 3)`` positions, ``(B, T)`` mask → ``(B, Q, out_dim)``."""
        memory = (self.token_in(self.standardise(tokens, positions))
                  + self.position_in(self.position_features(positions)))
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        pad = None if mask is None else ~mask.bool()
        for layer in self.layers:
            q = layer(q, memory, memory_key_padding_mask=pad)
        return self.out(q)


WORDS = "words"
_WORD_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]",
                  "eos_token": "[EOS]"}


def word_tokenizer(texts: list[str], min_frequency: int = 1) -> Any:
    """A lower-case word-level tokenizer (words and punctuation) fitted on ``texts``.

    Built with the ``tokenizers`` library (``WordLevel`` model, ``Whitespace`` pre-tokenizer)
    and wrapped as a ``transformers.PreTrainedTokenizerFast`` with ``[PAD] [UNK] [BOS] [EOS]``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise ValueError("a word-level tokenizer needs training reports; none were given")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins with spaces, tidies "x ."
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(
        special_tokens=list(_WORD_SPECIALS.values()), min_frequency=min_frequency))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **_WORD_SPECIALS)


def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    from .text import resolve_text_model

    return AutoTokenizer.from_pretrained(resolve_text_model(name) if name.lower() == "minilm"
                                         else name)


def build_decoder(config: DecoderConfig, source: str | os.PathLike | None = None,
                  texts: list[str] | None = None) -> tuple[nn.Module, Any]:
    """``(causal LM, tokenizer)`` of ``config``; ``source`` (a saved ``decoder/`` folder) rebuilds
    the architecture and tokenizer from it with random weights (the caller loads the weights);
    ``texts``: the training reports of a ``"words"`` tokenizer.

    Raises:
        ValueError: the decoder or tokenizer cannot be found (names the field and the fix).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    name = config.model_name_or_path
    try:
        if source is not None:
            tokenizer = _load_tokenizer(str(source))
        elif (config.tokenizer or "").lower() == WORDS:
            tokenizer = word_tokenizer(texts or [])
        else:
            tokenizer = _load_tokenizer(config.tokenizer or name)  # type: ignore[arg-type]
    except (OSError, ValueError) as err:
        raise ValueError(f"generator.decoder.tokenizer: cannot load "
                         f"{str(source or config.tokenizer or name)!r} ({str(err).splitlines()[0]}); "
                         "give a hub id available offline, a folder, or minilm") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    if source is not None:
        hf_config = AutoConfig.from_pretrained(source)
        return AutoModelForCausalLM.from_config(hf_config), tokenizer
    if name is None:
        bos, eos, pad = _special_ids(tokenizer)
        overrides = {"vocab_size": len(tokenizer), "bos_token_id": bos, "eos_token_id": eos,
                     "pad_token_id": pad, **config.config}
        hf_config = AutoConfig.for_model(config.model_type, **overrides)
        return AutoModelForCausalLM.from_config(hf_config), tokenizer
    if config.pretrained:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **config.config)
            if model.get_input_embeddings().num_embeddings < len(tokenizer):
                model.resize_token_embeddings(len(tokenizer))
            return model, tokenizer
        except OSError as err:
            log.warning("decoder %s: no weights available (%s); building it from its config "
                        "with random weights", name, str(err).splitlines()[0])
    try:
        hf_config = AutoConfig.from_pretrained(name, **config.config)
    except OSError as err:
        raise ValueError(f"generator.decoder.model_name_or_path: cannot find {name!r} "
                         f"({str(err).splitlines()[0]}); give a folder, a hub id that is cached, "
                         "or model_name_or_path: null with model_type + config") from None
    if getattr(hf_config, "vocab_size", len(tokenizer)) < len(tokenizer):
        hf_config.vocab_size = len(tokenizer)
    return AutoModelForCausalLM.from_config(hf_config), tokenizer


def _special_ids(tokenizer: Any) -> tuple[int, int, int]:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if bos is None or eos is None:
        raise ValueError("decoder tokenizer has neither bos/eos nor cls/sep tokens; use a tokenizer "
                         "with them (e.g. the decoder's own, or minilm)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(bos), int(eos), int(pad)


class ReportGenerator(nn.Module):
    """T3D vision tower + :class:`VisualResampler` + a Hugging Face causal LM (prefix conditioning).

    Args:
        config: :class:`ReportGeneratorConfig`.
        vision: a :class:`~t3d_models.vision.SwinUNETRBackbone` (e.g. ``T3DModel.vision`` of a
            pre-trained checkpoint); ``None`` builds one from ``config.vision`` (random weights).
        decoder_source: rebuild the decoder from this saved folder (used by :meth:`from_pretrained`).
        reports: training reports, for a ``"words"`` tokenizer.

    Example:
        >>> cfg = ReportGeneratorConfig(vision=VisionConfig(feature_size=12, window_size=4,
        ...     crop_size=(64, 64, 64)), decoder=DecoderConfig(tokenizer="minilm",
        ...     config={"n_layer": 1, "n_embd": 32, "n_head": 2}))
        >>> gen = ReportGenerator(cfg)
    """

    def __init__(self, config: ReportGeneratorConfig, vision: nn.Module | None = None,
                 decoder_source: str | os.PathLike | None = None,
                 reports: list[str] | None = None) -> None:
        super().__init__()
        self.config = config
        self.decoder, self.tokenizer = build_decoder(config.decoder, decoder_source, reports)
        if vision is None:
            from .vision import SwinUNETRBackbone

            vision = SwinUNETRBackbone.from_config(config.vision, restoration=False)
        self.vision = vision
        hidden = self.decoder.get_input_embeddings().embedding_dim
        self.resampler = VisualResampler(self.vision.token_channels, hidden, config.resampler)
        self.finding_head = (nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, len(config.findings)))
                             if config.findings else None)
        self.bos_id, self.eos_id, self.pad_id = _special_ids(self.tokenizer)
        self.apply_encoder_mode()

    # ------------------------------------------------------------------ encoder
    def apply_encoder_mode(self) -> None:
        """Set ``requires_grad`` of the vision tower by ``config.encoder``."""
        mode = self.config.encoder
        for p in self.vision.parameters():
            p.requires_grad = mode == "trainable"
        if mode == "partial":
            swin = self.vision.swin
            names = [f"layers{i}" for i in range(5 - self.config.trainable_stages, 5)]
            for name in names:
                for suffix in ("", "c"):
                    block = getattr(swin.swinViT, name + suffix, None)
                    if block is not None:
                        for p in block.parameters():
                            p.requires_grad = True
            for p in swin.encoder10.parameters():
                p.requires_grad = True

    @property
    def encoder_frozen(self) -> bool:
        return self.config.encoder == "frozen"

    def encode_crops(self, crops: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Visual tokens ``(N, L, C)`` of crops ``(N, 1, D, H, W)`` and their grid ``(d, h, w)``.

        No gradients reach a frozen encoder (and it runs in eval mode).
        """
        if self.encoder_frozen:
            was = self.vision.training
            self.vision.eval()
            try:
                with torch.no_grad():
                    tokens, grid = self.vision.tokens(self.vision.encode(crops, skips=False))
            finally:
                self.vision.train(was)
            return tokens, grid
        return self.vision.tokens(self.vision.encode(crops, skips=False))

    def study_tokens(self, crops: torch.Tensor, starts: list[tuple[int, int, int]],
                     volume_shape: tuple[int, int, int], batch_size: int = 4
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One study's ``(K*L, C)`` tokens and ``(K*L, 3)`` positions from its ``K`` crops."""
        if crops.shape[0] != len(starts):
            raise ValueError(f"{crops.shape[0]} crops but {len(starts)} crop starts")
        toks, pos = [], []
        for k in range(0, crops.shape[0], batch_size):
            t, grid = self.encode_crops(crops[k : k + batch_size])
            toks.append(t.reshape(-1, t.shape[-1]))
            for s in starts[k : k + batch_size]:
                pos.append(crop_token_positions(s, tuple(crops.shape[2:]), grid, volume_shape))
        return torch.cat(toks), torch.cat(pos).to(toks[0].device)

    # ------------------------------------------------------------------ text
    def tokenize_reports(self, reports: list[str], device: torch.device | None = None
                         ) -> dict[str, torch.Tensor]:
        """``bos + report + eos`` ids ``(B, L)`` and ``attention_mask``, right-padded."""
        enc = self.tokenizer(list(reports), add_special_tokens=False, truncation=True,
                             max_length=self.config.decoder.max_length - 2)
        rows = [[self.bos_id, *ids, self.eos_id] for ids in enc["input_ids"]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        device = device or self.device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    @property
    def device(self) -> torch.device:
        return next(self.resampler.parameters()).device

    # ------------------------------------------------------------------ forward / generate
    def prefix(self, tokens: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """The visual prefix ``(B, Q, hidden)`` of padded study tokens."""
        return self.resampler(tokens, positions, mask)

    def finding_logits(self, prefix: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` logits of ``config.findings`` from a visual prefix ``(B, Q, hidden)``."""
        if self.finding_head is None:
            raise ValueError("this generator has no finding head (generator.findings is empty)")
        return self.finding_head(prefix.mean(dim=1))

    @torch.no_grad()
    def predict_findings(self, tokens: torch.Tensor, positions: torch.Tensor,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, F)`` probabilities of ``config.findings`` for padded study tokens."""
        was = self.training
        self.eval()
        try:
            return torch.sigmoid(self.finding_logits(self.prefix(tokens, positions, mask)))
        finally:
            self.train(was)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                input_ids: torch.Tensor, attention_mask: torch.Tensor,
                finding_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Teacher-forced report loss given the visual tokens.

        Args:
            tokens: ``(B, T, C)`` visual tokens of the studies' crops (:func:`pad_studies`).
            positions: ``(B, T, 3)`` their positions.
            mask: ``(B, T)`` True for real tokens.
            input_ids: ``(B, L)`` from :meth:`tokenize_reports` (``bos`` first).
            attention_mask: ``(B, L)``.
            finding_labels: ``(B, F)`` 0/1 labels of ``config.findings`` (the auxiliary loss;
                needs a finding head).

        Returns:
            ``{"loss", "lm_loss", "logits": (B, Q + L, V)}`` and, with ``finding_labels``,
            ``"finding_loss"`` and ``"finding_logits"``: ``loss`` is the mean token
            cross-entropy over the report tokens and eos, plus ``finding_loss_weight`` x the
            findings' binary cross-entropy.
        """
        prefix = self.prefix(tokens, positions, mask)
        embeds = self.decoder.get_input_embeddings()(input_ids)
        inputs = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
        q = prefix.shape[1]
        attn = torch.cat([attention_mask.new_ones(attention_mask.shape[0], q), attention_mask], 1)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, 0] = -100  # bos is given, not predicted
        labels = torch.cat([labels.new_full((labels.shape[0], q), -100), labels], dim=1)
        out = self.decoder(inputs_embeds=inputs, attention_mask=attn, labels=labels)
        result = {"loss": out.loss, "lm_loss": out.loss, "logits": out.logits}
        if finding_labels is not None:
            logits = self.finding_logits(prefix)
            if finding_labels.shape != logits.shape:
                raise ValueError(f"finding_labels {tuple(finding_labels.shape)} do not match "
                                 f"(batch, findings) = {tuple(logits.shape)}")
            bce = nn.functional.binary_cross_entropy_with_logits(logits.float(),
                                                                 finding_labels.float())
            result.update(finding_loss=bce, finding_logits=logits,
                          loss=out.loss + self.config.finding_loss_weight * bce)
        return result

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, *,
                 max_new_tokens: int = 200, num_beams: int = 1, repetition_penalty: float = 1.0,
                 length_penalty: float = 1.0) -> list[str]:
        """Reports for a batch of studies: greedy (``num_beams=1``) or beam search.

        Returns:
            One decoded string per study (special tokens removed).
        """
        flags = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            prefix = self.prefix(tokens, positions, mask)
            bos = self.decoder.get_input_embeddings()(
                torch.full((prefix.shape[0], 1), self.bos_id, dtype=torch.long, device=prefix.device))
            inputs = torch.cat([prefix.to(bos.dtype), bos], dim=1)
            attn = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
            out = self.decoder.generate(inputs_embeds=inputs, attention_mask=attn,
                                        max_new_tokens=max_new_tokens, num_beams=num_beams,
                                        do_sample=False, repetition_penalty=repetition_penalty,
                                        length_penalty=length_penalty, eos_token_id=self.eos_id,
                                        pad_token_id=self.pad_id, bos_token_id=self.bos_id)
        finally:
            for m, flag in flags:
                m.training = flag
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # ------------------------------------------------------------------ I/O
    def save_pretrained(self, path: str | os.PathLike, card: dict | None = None) -> None:
        """Write ``report_config.json``, ``model.safetensors`` (every tensor), ``decoder/``
        (the decoder's HF config and tokenizer, for offline rebuilding) and ``README.md``.

        Each part is written aside and moved into place; ``report_config.json`` goes last.
        """
        from .io import save_state_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DECODER_DIR}-", dir=out))
        try:
            self.decoder.config.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            final = out / DECODER_DIR
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # tied weights (lm_head = embeddings) are cloned: every key is stored, none shared
        state = {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}
        save_state_file(state, out / WEIGHTS_NAME)
        facts = {"steps": None, **(card or {})}
        text = ("# T3D report generator\n\n"
                f"Encoder: {self.config.encoder_source or 'T3D vision tower'} ({self.config.encoder}); "
                f"decoder: {self.config.decoder.model_name_or_path or self.config.decoder.model_type}; "
                f"{self.config.resampler.num_queries} learned queries; prefix conditioning.\n\n"
                f"```json\n{json.dumps(facts, indent=2, default=str)}\n```\n")
        _atomic_text(out / "README.md", text)
        _atomic_text(out / CONFIG_NAME, self.config.model_dump_json(indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str = "cpu") -> ReportGenerator:
        """Rebuild from a folder written by :meth:`save_pretrained`; weights load strictly.

        Raises:
            ValueError: not such a folder (names the missing file), or mismatched weights.
        """
        from .io import check_state_dict, load_state_file

        folder = Path(path)
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.is_file():
            raise ValueError(f"{folder}: no {CONFIG_NAME}; pass the model/ folder written by "
                             "tools/finetune_report.py")
        config = ReportGeneratorConfig.model_validate_json(cfg_path.read_text(encoding="utf-8"))
        model = cls(config, decoder_source=folder / DECODER_DIR)
        state = load_state_file(folder / WEIGHTS_NAME, map_location)
        check_state_dict(model.state_dict(), state, what=f"report generator {folder}")
        model.load_state_dict(state, strict=True)
        return model

    @classmethod
    def from_t3d(cls, t3d_model: Any, config: ReportGeneratorConfig,
                 reports: list[str] | None = None) -> ReportGenerator:
        """A generator on the vision tower of a :class:`~t3d_models.T3DModel` (its restoration
        decoder, text tower and heads are not kept); vision and preprocessing config copied."""
        config = config.model_copy(update={"vision": t3d_model.config.vision,
                                           "preprocessing": t3d_model.config.preprocessing})
        vision = t3d_model.vision
        if getattr(vision, "restoration", False):
            from .vision import DECODER_MODULES

            for name in DECODER_MODULES:
                if hasattr(vision.swin, name):
                    delattr(vision.swin, name)
            vision.restoration = False
        return cls(config, vision=vision, reports=reports)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
