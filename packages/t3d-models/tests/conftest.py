"""Package test configuration: no network, ever; shared tiny models (built once per session)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# 2 shared cores: more intra-op threads than free cores made the steps several times slower
torch.set_num_threads(int(os.environ.get("T3D_TEST_THREADS", "1")))

REPORTS = [
    "No acute findings. Lungs are clear.",
    "Spiculated nodule of 12 mm in the right upper lobe, suspicious for malignancy.",
]


@pytest.fixture(scope="session")
def tiny_model():
    """The t3d-tiny-cpu preset in eval mode (do not mutate its weights in tests)."""
    from t3d_models import T3DModel

    torch.manual_seed(0)
    return T3DModel.from_preset("t3d-tiny-cpu").eval()


@pytest.fixture(scope="session")
def tiny_batch(tiny_model):
    """Two studies (two 64³ crops, then one), plus corrupted copies."""
    g = torch.Generator().manual_seed(1)
    crops = torch.rand(3, 1, 64, 64, 64, generator=g)
    corrupted = crops.clone()
    corrupted[:, :, :16] = torch.rand(3, 1, 16, 64, 64, generator=g)
    mask = torch.zeros_like(crops, dtype=torch.bool)
    mask[:, :, :16] = True
    return {
        "crops": crops,
        "study_index": torch.tensor([0, 0, 1]),
        "group": torch.tensor([0, 1]),
        **tiny_model.tokenize(REPORTS),
        "corrupted": corrupted,
        "corruption_mask": mask,
    }


@pytest.fixture(scope="session")
def tiny_out(tiny_model, tiny_batch):
    """One forward with restoration; records what the Swin encoder saw."""
    seen = []
    hook = tiny_model.vision.swin.swinViT.register_forward_hook(
        lambda mod, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            out = tiny_model(**tiny_batch)
    finally:
        hook.remove()
    return out, seen


def _plain(batch):
    return {k: v for k, v in batch.items() if k not in ("corrupted", "corruption_mask")}


@pytest.fixture(scope="session")
def reports():
    """The two reports of ``tiny_batch``."""
    return list(REPORTS)


@pytest.fixture(scope="session")
def tiny_plain_out(tiny_model, tiny_batch):
    """One forward without restoration."""
    with torch.no_grad():
        return tiny_model(**_plain(tiny_batch))


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model, tmp_path_factory):
    """``tiny_model`` saved with ``save_pretrained``."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny_model.save_pretrained(path)
    return path
