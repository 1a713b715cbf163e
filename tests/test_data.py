"""Datasets: embedded MNIST split, CIFAR-10 pickle format, lazy ImageFolder, class-covering samples."""

import datetime
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sinai.models import data
from sinai.models.data import cifar10, imagenet, load_dataset, mnist, sample, select_images

# ----------------------------------------------------------------------------------------------- MNIST


def test_mnist_split_sizes_classes_and_range():
    train, test = mnist("train"), mnist("test")
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(train.labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [100] * 10
    assert train.input_shape == test.input_shape == (1, 28, 28)
    assert train.num_classes == test.num_classes == 10
    assert (train.name, train.split, test.split) == ("mnist", "train", "test")
    x = test.load(torch.arange(len(test)))
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and x.max() == 1  # scaled by 255, not clipped


def test_mnist_split_is_disjoint_complete_and_matches_the_raw_images():
    images, labels = data._mnist_arrays()
    train_idx, test_idx = data._stratified_split(labels, data.MNIST_TEST_FRACTION, data.MNIST_SPLIT_SEED)
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(5000))
    test = mnist("test")
    assert torch.equal(test.labels, labels[test_idx])
    assert torch.equal(test.load(torch.arange(1000)), images[test_idx].float() / 255)


def test_mnist_split_is_deterministic():
    a, b = mnist("test"), mnist("test")
    assert torch.equal(a.labels, b.labels)
    idx = torch.tensor([0, 17, 999])
    assert torch.equal(a.load(idx), b.load(idx))


def test_mnist_unknown_split_names_the_choices():
    with pytest.raises(ValueError, match="train, test"):
        mnist("val")


def test_load_rejects_out_of_range_indices():
    with pytest.raises(IndexError, match="1000 images"):
        mnist("test").load(torch.tensor([1000]))


# -------------------------------------------------------------------------------------------- CIFAR-10


def write_cifar(folder, name="test_batch", n=20, seed=0, protocol=pickle.HIGHEST_PROTOCOL):
    """A batch in CIFAR-10's python format: uint8 (N, 3072) rows = R plane, G plane, B plane (32x32 each)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    y = [i % 10 for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": y, b"data": x, b"filenames": [b"f.png"] * n}
    (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return x, y


def write_meta(folder):
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer")] + [b"dog", b"frog"]
    names += [b"horse", b"ship", b"truck"]
    meta = {b"label_names": names, b"num_cases_per_batch": 10000, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def test_cifar10_round_trips_pixels_and_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    x, y = write_cifar(folder)
    write_meta(folder)
    ds = cifar10(tmp_path, "test")
    assert (len(ds), ds.num_classes, ds.input_shape, ds.name) == (20, 10, (3, 32, 32), "cifar10")
    assert ds.labels.tolist() == y
    assert ds.class_names[:2] == ("airplane", "automobile")
    imgs = ds.load(torch.arange(20))
    assert imgs.dtype == torch.float32
    assert torch.equal(imgs, torch.from_numpy(x).reshape(20, 3, 32, 32).float() / 255)
    # channel c, row h, column w is byte c*1024 + h*32 + w of the row
    for i, c, h, w in [(3, 1, 5, 7), (0, 0, 0, 31), (19, 2, 31, 0)]:
        assert imgs[i, c, h, w].item() == np.float32(x[i, c * 1024 + h * 32 + w]) / np.float32(255)


def test_cifar10_accepts_the_batches_folder_itself_and_load_dataset(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    assert len(cifar10(folder)) == 20
    assert len(load_dataset("cifar10", root=tmp_path)) == 20


def test_cifar10_reads_numpy1_pickles_and_refuses_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    x, _ = write_cifar(folder, protocol=2)
    raw = (folder / "test_batch").read_bytes()
    assert b"numpy._core.multiarray" in raw
    # numpy < 2 (and the original CIFAR-10 files) name numpy.core.multiarray._reconstruct
    (folder / "test_batch").write_bytes(raw.replace(b"numpy._core", b"numpy.core"))
    loaded = cifar10(tmp_path).load(torch.tensor([4]))[0]
    assert torch.equal(loaded, torch.from_numpy(x[4]).reshape(3, 32, 32) / 255)

    evil = {b"data": x, b"labels": [0] * 20, b"when": datetime.date(2020, 1, 1)}
    (folder / "test_batch").write_bytes(pickle.dumps(evil))
    with pytest.raises(ValueError, match="refusing to unpickle datetime.date"):
        cifar10(tmp_path)


def test_cifar10_missing_data_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        cifar10(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*cifar-10-python.tar.gz"):
        cifar10(tmp_path)
    write_cifar(tmp_path / "cifar-10-batches-py")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        cifar10(tmp_path, "train")


def test_cifar10_train_concatenates_five_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    parts = [write_cifar(folder, f"data_batch_{i}", n=10, seed=i)[0] for i in range(1, 6)]
    ds = cifar10(tmp_path, "train")
    assert len(ds) == 50
    assert torch.equal(ds.load(torch.tensor([23]))[0], torch.from_numpy(parts[2][3]).reshape(3, 32, 32) / 255)


# -------------------------------------------------------------------------------------------- ImageNet

COLORS = {"n01440764": (255, 0, 0), "n01443537": (0, 128, 0), "n01484850": (10, 20, 250)}


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "val"
    for k, (synset, color) in enumerate(COLORS.items()):
        (root / synset).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (40 + 10 * k, 50 + 5 * j), color).save(root / synset / f"img_{j}.png")
    return root


def test_imagenet_folder_labels_and_lazy_loading(image_folder):
    (image_folder / "n01484850" / "broken.png").write_bytes(b"not an image")  # decoded only if asked for
    ds = imagenet(image_folder, image_size=32)
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert ds.num_classes == 3 and ds.class_names == tuple(COLORS)
    assert ds.input_shape == (3, 32, 32) and ds.name == "imagenet"
    x = ds.load(torch.tensor([0, 3, 5]))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    for img, color in zip(x, [COLORS["n01440764"], COLORS["n01443537"], COLORS["n01484850"]], strict=True):
        expected = torch.tensor(color, dtype=torch.float32).view(3, 1, 1) / 255
        assert torch.allclose(img, expected.expand_as(img), atol=1.5 / 255)
    with pytest.raises(Exception, match="broken.png|cannot identify"):
        ds.load(torch.tensor([4]))


def test_imagenet_missing_or_empty_root_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="ROOT/<synset>/<image>.JPEG"):
        imagenet(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="valprep.sh"):
        imagenet(tmp_path / "empty")


def test_load_dataset_registry_errors(image_folder):
    with pytest.raises(ValueError, match="mnist, cifar10, imagenet"):
        load_dataset("svhn")
    for name in ("cifar10", "imagenet"):
        with pytest.raises(ValueError, match="--data-root"):
            load_dataset(name)
    with pytest.raises(ValueError, match="validation"):
        load_dataset("imagenet", root=image_folder, split="train")
    assert load_dataset("imagenet", root=image_folder, image_size=16).input_shape == (3, 16, 16)
    assert len(load_dataset("mnist", split="train")) == 4000


# -------------------------------------------------------------------------------------------- sampling


def shuffled_labels(n=100, k=10, seed=0):
    return (torch.arange(n) % k)[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def test_select_images_covers_every_class_distinct_sorted_and_seeded():
    labels = shuffled_labels()
    rng_state = torch.random.get_rng_state()
    idx = select_images(labels, 25, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # never the global RNG
    assert idx.numel() == 25 and idx.unique().numel() == 25
    assert torch.equal(idx, idx.sort().values)
    assert set(labels[idx].tolist()) == set(range(10))
    assert torch.equal(idx, select_images(labels, 25, seed=3))
    assert not torch.equal(idx, select_images(labels, 25, seed=4))


def test_select_images_edges():
    labels = shuffled_labels()
    one_each = select_images(labels, 10, seed=0)
    assert sorted(labels[one_each].tolist()) == list(range(10))
    assert torch.equal(select_images(labels, 100, seed=0), torch.arange(100))
    # the image chosen for a class varies with the seed (it is random among the class, not the first one)
    picks = {select_images(labels, 10, seed=s)[0].item() for s in range(30)}
    assert len(picks) > 3


def test_select_images_errors():
    labels = shuffled_labels()
    with pytest.raises(ValueError, match="at least 1"):
        select_images(labels, 0, seed=0)
    with pytest.raises(ValueError, match="only 100"):
        select_images(labels, 101, seed=0)
    with pytest.raises(ValueError, match="at least 10 images"):
        select_images(labels, 9, seed=0)
    with pytest.raises(ValueError, match=r"class\(es\) \[10\] have no image"):
        select_images(labels, 20, seed=0, num_classes=11)
    with pytest.raises(ValueError, match="must lie in"):
        select_images(labels, 20, seed=0, num_classes=5)


def test_sample_returns_matching_images_and_labels():
    ds = mnist("test")
    x, y = sample(ds, 20, seed=0)
    idx = select_images(ds.labels, 20, seed=0, num_classes=10)
    assert x.shape == (20, 1, 28, 28)
    assert torch.equal(y, ds.labels[idx]) and torch.equal(x, ds.load(idx))
    assert set(y.tolist()) == set(range(10))
