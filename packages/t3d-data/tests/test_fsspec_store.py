"""``VolumeStore`` on fsspec URLs (object storage for multi-node training): an in-memory and a
``file://`` copy of a store read exactly what the local fast path reads."""

import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from t3d_data import CropConfig, CropDataset, DataConfig, StoreError, VolumeStore, prepare


@pytest.fixture
def memory_copy():
    """Copies a local store into fsspec's in-memory file system; removed afterwards."""
    fs = fsspec.filesystem("memory")
    roots = []

    def copy(local):
        root = f"/t3d-{uuid.uuid4().hex[:8]}/store"
        for p in sorted(local.rglob("*")):
            if p.is_file():
                fs.pipe_file(f"{root}/{p.relative_to(local).as_posix()}", p.read_bytes())
        roots.append(root)
        return f"memory://{root}"

    yield copy
    for root in roots:
        fs.rm(root.rsplit("/", 1)[0], recursive=True)


def test_memory_and_file_urls_read_what_the_local_store_reads(tmp_path, make_dataset, memory_copy):
    manifest = make_dataset(3, shape=(37, 21, 18))
    local = tmp_path / "store"
    prepare(manifest, local, chunk=8, progress=False)
    ref = VolumeStore(local)
    assert ref.url is None and ref._fast_layout(0, "image") is not None
    rng = np.random.default_rng(0)
    boxes = [tuple(slice(int(a), int(a) + int(rng.integers(1, 20))) for a in
                   (rng.integers(0, s) for s in ref.shape(0))) for _ in range(12)]
    for url in (memory_copy(local), local.as_uri()):
        store = VolumeStore(url)
        assert store.url == url and store._fast_layout(0, "image") is None  # through zarr
        assert [r.model_dump() for r in store.records] == [r.model_dump() for r in ref.records]
        assert store.finding_names == ref.finding_names and url in repr(store)
        for i in range(len(ref)):
            assert np.array_equal(store.read(i), ref.read(i)), (url, i)
            if ref.records[i].has_mask:
                assert np.array_equal(store.read_mask(i), ref.read_mask(i)), (url, i)
        for box in boxes:
            assert np.array_equal(store.read(0, box), ref.read(0, box)), (url, box)
    # training crops: the same draws from the memory copy as from the local folder
    config = CropConfig(crop_size=(32, 32, 32), num_crops=2, seed=3)
    remote = CropDataset(memory_copy(local), config)  # the URL itself, as a config gives it
    here = CropDataset(ref, config)
    for i in range(len(ref)):
        a, b = remote[i], here[i]
        assert np.array_equal(np.asarray(a["crops"]), np.asarray(b["crops"])), i


def test_a_training_config_keeps_a_url_a_url():
    assert DataConfig(store="s3://bucket/t3d/store").store == "s3://bucket/t3d/store"
    assert DataConfig(store="data/store").store == Path("data/store")
    assert DataConfig(store=Path("/x")).store == Path("/x")


def test_a_url_without_a_store_names_the_fix():
    with pytest.raises(StoreError, match=r"memory://t3d-nowhere-.*index\.json missing.*prepare"):
        VolumeStore(f"memory://t3d-nowhere-{uuid.uuid4().hex[:8]}")
