"""Model registry: output shapes, knowledge-transfer freezing, local checkpoint loading."""
import pytest
import torch

from training.models import MODELS, build_model, head_name, set_backbone_trainable


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_model_maps_images_to_label_logits_and_kt_trains_only_the_head(name):
    model = build_model(name, num_labels=5, weights="none")
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    set_backbone_trainable(model, name, trainable=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(head_name(name) + ".") for n in trainable)
    set_backbone_trainable(model, name, trainable=True)
    assert all(p.requires_grad for p in model.parameters())


def test_local_checkpoint_loads_backbone_and_skips_a_head_of_another_label_set(tmp_path):
    source = build_model("resnet50", num_labels=14, weights="none")
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pth")
    model = build_model("resnet50", num_labels=1, weights=str(tmp_path / "ckpt.pth"))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 1


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save(build_model("small_cnn", 2).state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match="does not fit"):
        build_model("resnet50", 2, weights=str(tmp_path / "small.pth"))


def test_small_cnn_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model("small_cnn", 2, weights="imagenet")
