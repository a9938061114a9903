"""T3DModel: SwinUNETR + HF text encoder + interactor + projection heads (+ restoration).

Implements the model side of T3D (Liu et al., arXiv 2312.01529): visual-only embeddings ``v``,
text-informed embeddings ``x`` (TCL), study/report embeddings ``e``/``u`` (alignment) and the
text-informed restoration (TIR). Output keys follow docs/architecture.md exactly.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .config import T3DModelConfig
from .heads import ProjectionHead
from .interactor import Interactor
from .text import HFTextEncoder
from .vision import SwinUNETRBackbone

__all__ = ["T3DModel"]


def _check_study_index(study_index: torch.Tensor, num_studies: int) -> None:
    """Every study 0..B-1 must have a crop and no index may exceed B-1 (reads the values)."""
    counts = torch.bincount(study_index, minlength=num_studies)
    if counts.numel() > num_studies:
        raise ValueError(
            f"study_index holds {int(study_index.max())} but there are only {num_studies} reports"
        )
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"studies {empty} have no crops in study_index")


def _study_mean(emb: torch.Tensor, study_index: torch.Tensor, num_studies: int) -> torch.Tensor:
    """Mean of ``emb`` ``(N, E)`` per study -> ``(B, E)`` (no host-device synchronisation)."""
    ones = torch.ones_like(study_index, dtype=emb.dtype)
    counts = emb.new_zeros(num_studies).index_add(0, study_index, ones)
    total = emb.new_zeros(num_studies, emb.shape[1]).index_add(0, study_index, emb)
    return total / counts.clamp_min(1).unsqueeze(1)


class T3DModel(nn.Module):
    """The T3D pre-training model.

    Args:
        config: the full model config (see :class:`~t3d_models.config.T3DModelConfig`).
        text_source: load the text tower's architecture and tokenizer from this folder with
            random weights instead of ``config.text`` (used by :meth:`from_pretrained`).

    Example:
        >>> model = T3DModel.from_preset("t3d-tiny-cpu")
        >>> tok = model.tokenize(["No acute findings.", "Nodule in the left lower lobe."])
        >>> out = model(crops=torch.rand(4, 1, 64, 64, 64), study_index=torch.tensor([0, 0, 1, 1]),
        ...             group=torch.tensor([0, 1]), **tok)
        >>> sorted(out)
        ['crop_group', 'group', 'text_emb', 'text_informed_emb', 'visual_emb', 'volume_emb']
    """

    def __init__(self, config: T3DModelConfig, text_source: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.config = config
        vc, tc, ic = config.vision, config.text, config.interactor
        # text first: a missing text model fails before the (slower) vision build
        self.text = HFTextEncoder(
            model_name_or_path=text_source if text_source is not None else tc.model_name_or_path,
            max_length=tc.max_length,
            freeze=tc.freeze,
            freeze_layers=tc.freeze_layers,
            pretrained=tc.pretrained and text_source is None,
        )
        self.vision = SwinUNETRBackbone.from_config(vc, restoration=config.restoration)
        cv = self.vision.token_channels
        self.interactor = Interactor(
            visual_dim=cv,
            text_dim=self.text.width,
            width=ic.width,
            depth=ic.depth,
            heads=ic.heads,
            mlp_ratio=ic.mlp_ratio,
            dropout=ic.dropout,
        )
        e = config.embed_dim
        m = config.head_bn_momentum
        self.proj_v = ProjectionHead(cv, e, config.head, bn_momentum=m)
        self.proj_x = ProjectionHead(ic.width, e, config.head, bn_momentum=m)
        self.proj_t = ProjectionHead(self.text.width, e, config.text_head, bn_momentum=m)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: T3DModelConfig | dict) -> T3DModel:
        """Build from a config object or dict."""
        if isinstance(config, dict):
            config = T3DModelConfig.model_validate(config)
        return cls(config)

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> T3DModel:
        """Build a preset (see :func:`~t3d_models.config.list_presets`)."""
        return cls(T3DModelConfig.from_preset(name, **overrides))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu",
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        token: str | bool | None = None) -> T3DModel:
        """Load a folder written by :meth:`save_pretrained`, or a Hugging Face hub id.

        A hub id (``namespace/name``) is fetched with ``huggingface_hub.snapshot_download``
        (``revision``, ``cache_dir``, ``token``); under ``HF_HUB_OFFLINE=1`` only the cache is
        used. Strict (see :func:`t3d_models.io.load_pretrained`).
        """
        from .io import load_pretrained

        return load_pretrained(path, map_location=map_location, revision=revision,
                               cache_dir=cache_dir, token=token)

    def save_pretrained(self, path: str | os.PathLike, card: dict | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` (+ text config/tokenizer) + the
        ``README.md`` model card atomically; ``card``: training facts for the card (see
        :class:`t3d_models.card.CardFacts`)."""
        from .io import save_pretrained

        save_pretrained(self, path, card=card)

    def push_to_hub(self, repo_id: str, card: dict | None = None, **kwargs: object) -> object:
        """Save into a temporary folder and upload it (:func:`t3d_models.hub.push_to_hub`;
        ``kwargs``: ``private``, ``token``, ``revision``, ``commit_message``, ``create_repo``)."""
        import tempfile

        from .hub import check_repo_id, push_to_hub

        check_repo_id(repo_id)  # before the (slow) save
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, repo_id.rsplit("/", 1)[-1])
            self.save_pretrained(folder, card=card)
            return push_to_hub(folder, repo_id, **kwargs)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        """Device of the model parameters."""
        return next(self.parameters()).device

    def tokenize(self, reports: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise reports: ``{"input_ids": (B, L), "attention_mask": (B, L)}`` (CPU tensors)."""
        return self.text.tokenize(reports)

    def _check_inputs(self, crops: torch.Tensor, study_index: torch.Tensor, group: torch.Tensor,
                      input_ids: torch.Tensor, corrupted: torch.Tensor | None) -> None:
        if crops.ndim != 5 or crops.shape[1] != self.config.vision.in_channels:
            raise ValueError(
                f"crops must be (N, {self.config.vision.in_channels}, D, H, W); "
                f"got {tuple(crops.shape)}"
            )
        n, b = crops.shape[0], input_ids.shape[0]
        if study_index.shape != (n,):
            raise ValueError(f"study_index must be ({n},); got {tuple(study_index.shape)}")
        if group.shape != (b,):
            raise ValueError(f"group must be ({b},) (one per report); got {tuple(group.shape)}")
        if corrupted is not None and corrupted.shape != crops.shape:
            raise ValueError(
                f"corrupted {tuple(corrupted.shape)} must match crops {tuple(crops.shape)}"
            )
        if study_index.device.type == "cpu":  # on an accelerator this would force a sync
            _check_study_index(study_index, b)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        crops: torch.Tensor,
        study_index: torch.Tensor,
        group: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        corrupted: torch.Tensor | None = None,
        corruption_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Embeddings for TCL/alignment and, with ``corrupted``, the TIR restoration.

        Without ``corrupted`` the encoder runs once, on ``crops``. With ``corrupted`` it runs on
        the corrupted crops for the restoration and, when ``config.contrastive_input`` is
        ``"clean"`` (the default), a second time on the clean ``crops`` (no decoder skips) for
        the embeddings, so training embeds the same kind of input as evaluation.

        Args:
            crops: ``(N, 1, D, H, W)`` float crops in [0, 1]; spatial sizes multiples of 32.
            study_index: ``(N,)`` long, the study (0..B-1) of each crop.
            group: ``(B,)`` long report group per study.
            input_ids: ``(B, L)`` token ids (from :meth:`tokenize`).
            attention_mask: ``(B, L)`` 1 for tokens, 0 for padding.
            corrupted: ``(N, 1, D, H, W)`` corrupted crops for TIR (ignored, with a warning,
                when the model was built with ``restoration=False``).
            corruption_mask: ``(N, 1, D, H, W)`` where the corruption was applied (passed
                through for the loss; ones when not given).

        Returns:
            ``visual_emb (N, E)``, ``text_informed_emb (N, E)``, ``crop_group (N,)``,
            ``volume_emb (B, E)``, ``text_emb (B, E)``, ``group (B,)`` and, with ``corrupted``,
            ``restored``, ``target`` (= ``crops``), ``corruption_mask`` ``(N, 1, D, H, W)``.

        Raises:
            ValueError: inconsistent shapes, a study without crops (checked for CPU
                ``study_index`` only: reading its values on a GPU would stall the step), or a
                crop size that is not a multiple of 32 (naming the dimension).
        """
        self._check_inputs(crops, study_index, group, input_ids, corrupted)
        if corrupted is not None and not self.config.restoration:
            warnings.warn("restoration=False: ignoring `corrupted`; no TIR outputs", stacklevel=2)
            corrupted = None
        restore = corrupted is not None
        feats = self.vision.encode(corrupted if restore else crops, skips=restore)
        tokens, grid = self.vision.tokens(feats)
        text_tokens, text_mask, text_pooled = self.text(input_ids, attention_mask)
        text_emb = self.proj_t(text_pooled)
        informed = self.interactor(tokens, text_tokens, text_mask, study_index)

        clean_tokens, clean_informed = tokens, informed
        if restore and self.config.contrastive_input == "clean":
            clean_tokens, _ = self.vision.tokens(self.vision.encode(crops, skips=False))
            clean_informed = self.interactor(clean_tokens, text_tokens, text_mask, study_index)
        visual_emb = self.proj_v(clean_tokens.mean(1))
        text_informed_emb = self.proj_x(clean_informed.mean(1))

        out = {
            "visual_emb": visual_emb,
            "text_informed_emb": text_informed_emb,
            "crop_group": group[study_index],
            "volume_emb": _study_mean(visual_emb, study_index, input_ids.shape[0]),
            "text_emb": text_emb,
            "group": group,
        }
        if restore:
            restored = self.vision.restore(feats, self.interactor.to_visual(informed), grid)
            if corruption_mask is None:
                corruption_mask = torch.ones_like(crops, dtype=torch.bool)
            out.update(restored=restored, target=crops, corruption_mask=corruption_mask)
        return out

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, lr: float, weight_decay: float = 0.05, vision_lr_mult: float = 0.1,
                     text_lr_mult: float = 0.1, extra: nn.Module | None = None) -> list[dict]:
        """AdamW parameter groups: the pre-trained or deep towers learn slower than the heads.

        The SwinUNETR *encoder* (``vision.swin`` minus the restoration decoder) gets
        ``lr * vision_lr_mult`` and the text encoder ``lr * text_lr_mult``; the projection
        heads, the interactor, the restoration decoder and the parameters of ``extra`` (e.g.
        the objective's learnable temperatures) get ``lr``. At one learning rate the encoder
        updates drive the crop embedding to a constant within ~10 steps (docs/pretraining.md).
        Biases, norm weights and temperatures get no weight decay. Frozen parameters are left
        out. Each group carries its ``lr`` (schedulers such as ``LambdaLR`` scale it) and a
        ``name``; empty groups are dropped.

        >>> model = T3DModel.from_preset("t3d-tiny-cpu")
        >>> groups = model.param_groups(lr=1e-3)
        >>> sorted({(g["name"].split("/")[0], round(g["lr"], 8)) for g in groups})
        [('heads', 0.001), ('text', 0.0001), ('vision', 0.0001)]
        """
        from .vision import ENCODER_MODULES

        encoder = tuple(f"vision.swin.{m}." for m in ENCODER_MODULES)
        named = [(n, p) for n, p in self.named_parameters()]
        if extra is not None:
            named += [(f"extra.{n}", p) for n, p in extra.named_parameters()]
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, p in named:
            if not p.requires_grad:
                continue
            tower = ("vision" if name.startswith(encoder) else
                     "text" if name.startswith("text.") else "heads")
            decay = p.ndim >= 2 and "logit" not in name and not name.endswith(".bias")
            groups.setdefault((tower, decay), []).append(p)
        mult = {"vision": vision_lr_mult, "text": text_lr_mult, "heads": 1.0}
        return [{"params": params, "lr": lr * mult[tower],
                 "weight_decay": weight_decay if decay else 0.0,
                 "name": f"{tower}/{'decay' if decay else 'no_decay'}"}
                for (tower, decay), params in sorted(groups.items())]

    # ------------------------------------------------------------------ evaluation
    def encode_volume_crops(
        self,
        crops: torch.Tensor,
        study_index: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Visual-only embeddings ``proj_v(pool(V))`` of crops, per crop or per study.

        Wrap in ``torch.no_grad()`` for evaluation.

        Args:
            crops: ``(N, 1, D, H, W)``.
            study_index: ``(N,)``; when given, returns the per-study mean ``(B, E)`` with
                ``B = study_index.max() + 1``.
            batch_size: encode in chunks of this many crops (default: all at once).

        Returns:
            ``(N, E)`` or ``(B, E)``.
        """
        chunks = [crops] if not batch_size else list(crops.split(batch_size))
        embs = []
        for chunk in chunks:
            feats = self.vision.encode(chunk.to(self.device), skips=False)
            tokens, _ = self.vision.tokens(feats)
            embs.append(self.proj_v(tokens.mean(1)))
        emb = torch.cat(embs)
        if study_index is None:
            return emb
        num_studies = int(study_index.max()) + 1
        _check_study_index(study_index.cpu(), num_studies)
        return _study_mean(emb, study_index.to(emb.device), num_studies)

    def encode_text(self, reports: list[str] | dict[str, torch.Tensor]) -> torch.Tensor:
        """Report embeddings ``proj_t(masked_mean(T))`` ``(B, E)`` from text or tokens."""
        tok = self.tokenize(reports) if isinstance(reports, list | tuple) else reports
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        return self.proj_t(self.text(ids, mask)[2])
