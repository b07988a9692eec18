import io
import uuid

import duckdb
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from helpers import write_direct_dataset
from shards import DatasetError, ShardDataset, decode_image, location, read_example
from shards.manifest import MANIFEST_NAME

UNEVEN = [1, 7, 30, 2, 13]


@pytest.fixture(params=["local", "memory"])
def dataset_url(request, tmp_path):
    url = str(tmp_path / "ds") if request.param == "local" else f"memory://onion-test-{uuid.uuid4().hex}"
    return url, write_direct_dataset(url, UNEVEN)


def decoded_truth(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).transpose(2, 0, 1)


def test_round_trip_images_labels_keys(dataset_url):
    url, truth = dataset_url
    seen = {}
    for image, label, key in ShardDataset(url, shuffle=True, seed=1):
        assert key not in seen
        seen[key] = (image, label)
    assert set(seen) == set(truth)
    for key, (image, label) in seen.items():
        assert label == truth[key][0]
        assert image.dtype == torch.uint8 and np.array_equal(image.numpy(), decoded_truth(truth[key][1]))


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_exact_once_with_dataloader_workers(tmp_path, num_workers):
    url = str(tmp_path / "ds")
    truth = write_direct_dataset(url, UNEVEN)
    dataset = ShardDataset(url, seed=5, buffer_size=8)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        keys = [key for _, _, key in DataLoader(dataset, batch_size=None, num_workers=num_workers)]
        assert sorted(keys) == sorted(truth), f"epoch {epoch}"


def test_exact_once_across_two_ranks_with_uneven_shards(tmp_path):
    url = str(tmp_path / "ds")
    truth = write_direct_dataset(url, UNEVEN)
    per_rank = []
    for rank in (0, 1):
        dataset = ShardDataset(url, rank=rank, world_size=2, seed=2)
        loader = DataLoader(dataset, batch_size=None, num_workers=2)
        per_rank.append([key for _, _, key in loader])
        assert len(per_rank[-1]) == len(dataset)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(truth)
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    url = str(tmp_path / "ds")
    write_direct_dataset(url, UNEVEN)

    def order(seed, epoch):
        return [k for *_, k in _with_epoch(ShardDataset(url, seed=seed, buffer_size=16), epoch)]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert sorted(order(0, 0)) == sorted(order(0, 1))


def _with_epoch(dataset, epoch):
    dataset.set_epoch(epoch)
    return dataset


def test_batches_made_by_the_worker(tmp_path):
    url = str(tmp_path / "ds")
    truth = write_direct_dataset(url, UNEVEN)
    batches = list(DataLoader(ShardDataset(url, batch_size=16), batch_size=None, num_workers=2))
    assert sum(len(keys) for _, _, keys in batches) == len(truth)
    images, labels, keys = batches[0]
    assert images.shape[1:] == (3, 8, 8) and labels.tolist() == [truth[k][0] for k in keys]


def test_stock_webdataset_reads_our_shards(tmp_path):
    url = tmp_path / "ds"
    truth = write_direct_dataset(str(url), UNEVEN)
    shards = sorted(str(p) for p in url.glob("train-*.tar"))
    seen = {}
    for sample in wds.WebDataset(shards, shardshuffle=False).decode("pil"):
        seen[sample["__key__"]] = sample
    assert set(seen) == set(truth)
    key = next(iter(truth))
    assert seen[key]["cls"] == truth[key][0]
    assert seen[key]["json"]["key"] == key
    assert np.array_equal(np.asarray(seen[key]["png"]).transpose(2, 0, 1), decoded_truth(truth[key][1]))


def test_duckdb_queries_the_index(tmp_path):
    url = tmp_path / "ds"
    truth = write_direct_dataset(str(url), UNEVEN)
    rows = duckdb.sql(f"select shard, count(*) n from '{url}/index/*.parquet' group by shard order by shard").fetchall()
    assert [n for _, n in rows] == UNEVEN
    labels = duckdb.sql(f"select key, label from '{url}/index/*.parquet'").fetchall()
    assert dict(labels) == {k: v[0] for k, v in truth.items()}


def test_byte_range_read_equals_streamed(dataset_url):
    url, truth = dataset_url
    streamed = {key: image for image, _, key in ShardDataset(url, shuffle=False)}
    for key in list(truth)[::9]:
        example = read_example(url, key)
        assert example.image == truth[key][1] and example.label == truth[key][0]
        assert torch.equal(decode_image(example.image), streamed[key])
    with pytest.raises(KeyError, match="no example with key 'missing'"):
        read_example(url, "missing")


def test_dataset_without_manifest_is_refused(tmp_path):
    url = str(tmp_path / "ds")
    write_direct_dataset(url, UNEVEN)
    location(url).remove(MANIFEST_NAME)
    with pytest.raises(DatasetError, match="no manifest.json, so the dataset is incomplete"):
        ShardDataset(url)


def test_verify_names_the_corrupt_shard(tmp_path):
    url = tmp_path / "ds"
    write_direct_dataset(str(url), UNEVEN)
    shard = url / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    damaged = r"train-000002.tar: member ex-00008.\*: its bytes do not match the sha256 in the index"
    with pytest.raises(DatasetError, match=damaged):
        list(ShardDataset(str(url)))
    with pytest.raises(DatasetError, match="train-000002.tar: sha256 .* does not match the manifest"):
        list(ShardDataset(str(url), verify="shards"))
    assert len(list(ShardDataset(str(url), verify="none"))) == sum(UNEVEN)  # libspng skips the checksums


def test_undecodable_member_names_shard_and_key(tmp_path):
    url = str(tmp_path / "ds")
    write_direct_dataset(url, [4, 4], image_bytes=lambda key, png: b"GIF89a garbage" if key == "ex-00005" else png)
    with pytest.raises(DatasetError, match=r"train-000001.tar: member ex-00005.\* does not decode"):
        list(ShardDataset(url, batch_size=3))


def test_unknown_split_is_named(tmp_path):
    url = str(tmp_path / "ds")
    write_direct_dataset(url, [3])
    with pytest.raises(DatasetError, match="no split 'test' \\(splits: train\\)"):
        ShardDataset(url, split="test")


@pytest.mark.parametrize("num_workers", [0, 1, 3])
def test_resume_mid_epoch_continues_at_the_same_batch(tmp_path, num_workers):
    url = str(tmp_path / "ds")
    write_direct_dataset(url, UNEVEN)
    dataset = ShardDataset(url, seed=4, batch_size=5, buffer_size=7)
    dataset.set_epoch(2)
    whole = [keys for _, _, keys in DataLoader(dataset, batch_size=None, num_workers=num_workers)]
    for start in (1, 4, len(whole) - 1):
        dataset.set_epoch(2, start_batch=start)
        resumed = [keys for _, _, keys in DataLoader(dataset, batch_size=None, num_workers=num_workers)]
        assert resumed == whole[start:]


def test_persistent_workers_follow_set_epoch(tmp_path):
    """Workers kept across epochs see each new epoch (and a resume point) set in the main process."""
    url = str(tmp_path / "ds")
    write_direct_dataset(url, UNEVEN)

    def batches(loader, dataset, epoch, start_batch=0):
        dataset.set_epoch(epoch, start_batch)
        return [keys for _, _, keys in loader]

    fresh = ShardDataset(url, seed=6, batch_size=4, buffer_size=9)
    expected = {(epoch, start): batches(DataLoader(fresh, batch_size=None, num_workers=2), fresh, epoch, start)
                for epoch, start in ((0, 0), (1, 3), (2, 0))}
    assert expected[(0, 0)] != expected[(2, 0)]
    kept = ShardDataset(url, seed=6, batch_size=4, buffer_size=9)
    loader = DataLoader(kept, batch_size=None, num_workers=2, persistent_workers=True)
    for epoch, start in ((0, 0), (1, 3), (2, 0)):
        assert batches(loader, kept, epoch, start) == expected[(epoch, start)], (epoch, start)
