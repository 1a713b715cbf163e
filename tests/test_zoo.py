"""Models by name: timm and torchvision builds, checkpoints, local-cache-only pretrained weights, errors."""

import os

import huggingface_hub.constants
import pytest
import timm
import torch
import torchvision
from conftest import images
from safetensors.torch import save_file

from sinai.models.classifier import ImageClassifier
from sinai.models.zoo import default_dataset, load_checkpoint, load_model

# timm's own test network: a real ViT with a Hugging Face weight id, 0.4M parameters, input (3, 160, 160)
TINY_TIMM = "test_vit"


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the Hugging Face and torch hub caches at empty folders (huggingface_hub reads env at import)."""
    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path


def test_timm_random_vit_takes_unit_images():
    model = load_model("timm:vit_tiny_patch16_224", weights="random")
    assert isinstance(model, ImageClassifier) and not model.training
    assert (model.input_shape, model.num_classes) == ((3, 224, 224), 1000)
    assert model.name == "timm:vit_tiny_patch16_224"
    with torch.no_grad():
        assert model(images(1, model.input_shape)).shape == (1, 1000)


def test_classifier_normalizes_with_the_model_config():
    model = load_model(f"timm:{TINY_TIMM}", weights="random", num_classes=10)
    cfg = timm.data.resolve_model_data_config(model.net)
    assert model.input_shape == tuple(cfg["input_size"]) and model.num_classes == 10
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = images(2, model.input_shape)
    with torch.no_grad():
        assert torch.equal(model(x), model.net((x - mean) / std))


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "module", "safetensors"])
def test_timm_checkpoint_round_trip(tmp_path, wrap):
    net = timm.create_model(TINY_TIMM, pretrained=False, num_classes=10).eval()
    state = net.state_dict()
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pth")
    if wrap == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif wrap == "module":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif wrap == "raw":
        torch.save(state, path)
    else:
        torch.save({wrap: state, "epoch": 3}, path)
    model = load_model(f"timm:{TINY_TIMM}", checkpoint=path, num_classes=10)
    reference = ImageClassifier(net, input_shape=(3, 160, 160), num_classes=10, mean=[0.5] * 3, std=[0.5] * 3)
    x = images(2, model.input_shape)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_checkpoint_of_an_image_classifier_loads(tmp_path):
    """A state_dict saved from the wrapper itself has "net." keys."""
    model = load_model(f"timm:{TINY_TIMM}", weights="random", num_classes=10)
    torch.save(model.state_dict(), tmp_path / "c.pt")
    assert set(load_checkpoint(tmp_path / "c.pt")) == set(model.net.state_dict())
    again = load_model(f"timm:{TINY_TIMM}", checkpoint=tmp_path / "c.pt", num_classes=10)
    x = images(2, model.input_shape)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_timm_pretrained_reads_the_local_hf_cache_only(empty_caches):
    before = (os.environ.get("HF_HUB_OFFLINE"), huggingface_hub.constants.HF_HUB_OFFLINE)
    with pytest.raises(FileNotFoundError, match="--checkpoint") as err:
        load_model(f"timm:{TINY_TIMM}")
    assert str(empty_caches / "hf" / "hub") in str(err.value)
    assert "timm/test_vit.r160_in1k" in str(err.value)
    assert (os.environ.get("HF_HUB_OFFLINE"), huggingface_hub.constants.HF_HUB_OFFLINE) == before

    # the same weights placed in the cache layout huggingface_hub writes are found without a network
    net = timm.create_model(TINY_TIMM, pretrained=False)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_caches / "hf" / "hub" / "models--timm--test_vit.r160_in1k"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    weights = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(weights, str(repo / "snapshots" / commit / "model.safetensors"))
    model = load_model(f"timm:{TINY_TIMM}")
    assert model.num_classes == 1000
    for key, value in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key


def test_pretrained_head_size_must_match():
    with pytest.raises(ValueError, match="1000 classes, not 10"):
        load_model(f"timm:{TINY_TIMM}", num_classes=10)
    with pytest.raises(ValueError, match="1000 classes, not 10"):
        load_model("torchvision:resnet18", num_classes=10)


def test_torchvision_random_and_checkpoint_round_trip(tmp_path):
    model = load_model("torchvision:resnet18", weights="random")
    assert (model.input_shape, model.num_classes) == ((3, 224, 224), 1000)
    assert model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    x = images(2, model.input_shape)
    with torch.no_grad():
        assert model(x).shape == (2, 1000)
    torch.save({"state_dict": model.net.state_dict()}, tmp_path / "r18.pth")
    again = load_model("torchvision:resnet18", checkpoint=tmp_path / "r18.pth")
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_torchvision_pretrained_reads_the_torch_hub_cache_only(empty_caches):
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth") as err:
        load_model("torchvision:resnet18")
    assert "--checkpoint" in str(err.value)
    folder = empty_caches / "torch" / "hub" / "checkpoints"
    assert str(folder) in str(err.value)
    net = torchvision.models.resnet18()
    folder.mkdir(parents=True)
    torch.save(net.state_dict(), folder / "resnet18-f37072fd.pth")
    model = load_model("torchvision:resnet18")
    assert torch.equal(model.net.fc.weight, net.fc.weight)


@pytest.mark.parametrize(
    "name, match",
    [
        ("resnet50", "accepted names"),
        ("keras:resnet50", "accepted names"),
        ("timm:", "accepted names"),
        ("timm:no_such_net", r"timm.list_models\('\*no\*'\)"),
        ("torchvision:no_such_net", "torchvision.models.list_models"),
    ],
)
def test_unknown_names(name, match):
    with pytest.raises(ValueError, match=match):
        load_model(name, weights="random")


def test_bad_arguments():
    with pytest.raises(ValueError, match="pretrained, random"):
        load_model("torchvision:resnet18", weights="imagenet")
    with pytest.raises(ValueError, match="embedded"):
        load_model("mnist-cnn", checkpoint="x.pt")


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_model(f"timm:{TINY_TIMM}", checkpoint=tmp_path / "nope.pth")


def test_mismatched_checkpoint_names_keys(tmp_path):
    state = timm.create_model(TINY_TIMM, pretrained=False, num_classes=10).state_dict()
    torch.save(state, tmp_path / "ten.pth")
    with pytest.raises(ValueError, match=r"head.weight: checkpoint \(10, .*num_classes"):
        load_model(f"timm:{TINY_TIMM}", checkpoint=tmp_path / "ten.pth")
    state.pop("head.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"missing key\(s\) e.g. \['head.bias'\].*unexpected .* \['extra"):
        load_model(f"timm:{TINY_TIMM}", checkpoint=tmp_path / "odd.pth", num_classes=10)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="no state_dict"):
        load_model(f"timm:{TINY_TIMM}", checkpoint=tmp_path / "list.pth")


def test_default_dataset():
    assert default_dataset("mnist-vit") == "mnist"
    assert default_dataset("timm:vit_base_patch16_224") == "imagenet"
    assert default_dataset("timm:resnet18", num_classes=10) == "cifar10"
    with pytest.raises(ValueError, match="accepted names"):
        default_dataset("bogus")


def test_a_new_model_is_one_decorated_definition(monkeypatch):
    from torch import nn

    from sinai.models import zoo

    assert tuple(m for m in zoo.list_models() if m != "sweep-cnn") == (  # sweep-cnn: test_sweep's
        "mnist-cnn", "mnist-vit", "mnist-cnn-at", "mnist-cnn-surrogate", "mnist-cnn-selective",
        "mnist-cnn-mfdv", "mnist-vit-mfdv", "timm:<name>", "torchvision:<name>",
    )  # fmt: skip
    monkeypatch.setattr(zoo, "_MODELS", dict(zoo._MODELS))

    @zoo.register_model("toy", dataset="cifar10")
    def toy(arch, **options):
        net = nn.Sequential(nn.Flatten(), nn.Linear(4, 10))
        return ImageClassifier(net, input_shape=(1, 2, 2), num_classes=10, mean=(0.5,), std=(0.5,), name=arch)

    assert zoo.list_models()[-3] == "toy"  # after the other models, before the families
    model = load_model("toy")
    assert model.name == "toy" and not model.training and default_dataset("toy") == "cifar10"
    with pytest.raises(ValueError, match="already registered"):
        zoo.register_model("toy", dataset="mnist")(toy)
    with pytest.raises(
        ValueError,
        match=r"accepted names: mnist-cnn, mnist-vit, mnist-cnn-at\[:eps=E,steps=S,alpha=A\], "
        r"mnist-cnn-surrogate, mnist-cnn-selective\[:k=K\], mnist-cnn-mfdv\[:lambda1=L\], "
        r"mnist-vit-mfdv\[:lambda1=L\], (sweep-cnn, )?toy, timm:",
    ):
        load_model("toy:x")
