"""Model registry: every model trains a few steps, knowledge-transfer freezing, the attention
DenseNets' maps, metadata fusion, partial VGG16 transfer, the VGG-like net, local checkpoints."""
import math

import pytest
import torch
from torch import nn

from training.gradcam import class_activation_map
from training.models import (AGE_MEAN, AGE_STD, METADATA_WIDTH, MODELS, build_model, head_name, in_head,
                             metadata_features, set_backbone_trainable, uses_metadata)

NUM_LABELS = 3
VGG16_UPPER_CONVS = [f"features.{i}" for i in (10, 12, 14, 17, 19, 21, 24, 26, 28)]
# What knowledge transfer trains, written out rather than read from the registry.
KT_TRAINS = {
    "densenet121": ["classifier"],
    "densenet121_attA": ["attention", "classifier"],
    "densenet121_attB": ["attention", "classifier"],
    "resnet18": ["fc"],
    "resnet18_half": ["fc"],
    "resnet50": ["fc"],
    "small_cnn": ["classifier"],
    "vgg16_partial": VGG16_UPPER_CONVS + ["classifier"],
    "vgg_like": ["classifier"],
}
KT_TRAINS.update({f"{name}+meta": [f"backbone.{p}" for p in prefixes] + ["metadata_encoder", "head"]
                  for name, prefixes in list(KT_TRAINS.items())})


def tiny_batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    targets = torch.randint(0, 2, (2, NUM_LABELS), generator=generator).float()
    return images, targets, metadata_features([30, None], ["M", "F"], ["PA", "AP"])


def test_the_registry_lists_every_model_with_and_without_metadata():
    assert set(MODELS) == set(KT_TRAINS)
    assert all(uses_metadata(name) == name.endswith("+meta") for name in MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_model_maps_images_to_logits_and_trains_a_few_steps(name):
    torch.manual_seed(0)
    model = build_model(name, NUM_LABELS, "none")
    model.train()
    for module in model.modules():  # dropout off, so the loss on the fixed batch is deterministic
        if isinstance(module, nn.Dropout):
            module.eval()
    images, targets, metadata = tiny_batch()
    inputs = (images, metadata) if uses_metadata(name) else (images,)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []  # of the batch before each step: the last one is after two steps
    for _ in range(3):
        logits = model(*inputs)
        assert logits.shape == (2, NUM_LABELS)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        # every parameter is used (DDP needs that) and gets a finite gradient
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("name", sorted(MODELS))
def test_knowledge_transfer_trains_only_the_head(name):
    with torch.device("meta"):  # parameters without storage: only their names and flags matter here
        model = build_model(name, NUM_LABELS, "none")
    set_backbone_trainable(model, name, trainable=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in KT_TRAINS[name])}
    assert trainable == expected and 0 < len(trainable) < len(list(model.parameters()))
    set_backbone_trainable(model, name, trainable=True)
    assert all(p.requires_grad for p in model.parameters())


def test_head_modules_of_an_attention_model_leave_its_backbone_out():
    """train.py keeps the frozen backbone's BatchNorm in eval mode: modules outside the head."""
    with torch.device("meta"):
        model = build_model("densenet121_attA", NUM_LABELS)
    head_modules = [n for n, _ in model.named_modules() if in_head(n, head_name("densenet121_attA"))]
    assert "classifier" in head_modules and "attention.2.project" in head_modules
    assert not any(n.startswith("features") for n in head_modules)


@pytest.mark.parametrize("name", ["densenet121_attA", "densenet121_attB"])
def test_attention_maps_are_distributions_over_transition_positions_and_train(name):
    torch.manual_seed(0)
    model = build_model(name, NUM_LABELS)
    images, targets, _ = tiny_batch()
    nn.functional.binary_cross_entropy_with_logits(model(images), targets).backward()
    for attention in model.attention:  # from the zero start (uniform maps) the gradient moves u
        assert attention.u.grad.abs().sum() > 0
        if name.endswith("attA"):
            assert attention.project.weight.grad.abs().sum() > 0

    with torch.no_grad():
        for attention in model.attention:
            attention.u.normal_()
        model(images)
    assert [tuple(m.shape) for m in model.last_attention] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]  # 64 / 8, 16, 32
    for attention_map in model.last_attention:
        assert torch.allclose(attention_map.sum(dim=(1, 2)), torch.ones(2)) and attention_map.min() >= 0
        assert attention_map.std() > 0

    cam = class_activation_map(model, model.features.norm5, images, 1)  # Grad-CAM's DenseNet target is kept
    assert cam.shape == (2, 64, 64)


def test_metadata_features_standardise_age_and_encode_unknowns_as_zeros():
    features = metadata_features([AGE_MEAN + AGE_STD, None, math.nan, AGE_MEAN],
                                 ["M", "F", None, "U"], ["PA", "LATERAL", "RL", None])
    assert features.dtype == torch.float32 and features.shape == (4, METADATA_WIDTH)
    assert torch.allclose(features, torch.tensor([
        [1.0, 1, 0, 1, 0, 0, 0],
        [0.0, 0, 1, 0, 0, 0, 1],
        [0.0, 0, 0, 0, 0, 0, 0],
        [0.0, 0, 0, 0, 0, 0, 0],
    ]))


def test_metadata_features_refuse_columns_of_different_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        metadata_features([40], ["M", "F"], ["PA"])


@pytest.mark.parametrize("name", ["small_cnn+meta", "resnet18+meta"])
def test_fusion_logits_depend_on_metadata_and_train_the_metadata_encoder(name):
    torch.manual_seed(0)
    model = build_model(name, NUM_LABELS).eval()
    images, targets, _ = tiny_batch()
    male, female = (metadata_features([60, 60], [sex, sex], ["PA", "PA"]) for sex in ("M", "F"))
    logits = model(images, male)
    assert not torch.allclose(logits, model(images, female))
    nn.functional.binary_cross_entropy_with_logits(logits, targets).backward()
    assert model.metadata_encoder[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="metadata_features"):
        model(images)


def test_vgg16_partial_takes_imagenet_weights_for_the_first_two_conv_blocks_only(monkeypatch):
    from torchvision.models import VGG16_Weights, vgg16

    with torch.device("meta"):  # ImageNet-shaped state dict, without allocating or downloading it
        shapes = {key: value.shape for key, value in vgg16().state_dict().items()}
    fake_imagenet = {key: torch.full(shape, 0.5) for key, shape in shapes.items()}
    monkeypatch.setattr(VGG16_Weights, "get_state_dict", lambda self, **kwargs: fake_imagenet)
    model = build_model("vgg16_partial", NUM_LABELS, "imagenet")
    for transferred in ("features.0", "features.2", "features.5", "features.7"):
        assert (model.get_submodule(transferred).weight == 0.5).all()
    for untransferred in VGG16_UPPER_CONVS + ["classifier.0", "classifier.3"]:
        assert not (model.get_submodule(untransferred).weight == 0.5).any()
    assert model.classifier[6].out_features == NUM_LABELS
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, NUM_LABELS)


def test_vgg_like_starts_xavier_initialised_and_reads_the_first_channel_only():
    torch.manual_seed(0)
    model = build_model("vgg_like", NUM_LABELS).eval()
    for layer in (model.features[3], model.fc[1]):  # a 32->32 3x3 conv, the 4096->2048 linear
        fan_in, fan_out = layer.weight[0].numel(), layer.weight[:, 0].numel()
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.05)
    images = torch.randn(2, 3, 64, 64)
    changed = images.clone()
    changed[:, 1:] = torch.randn(2, 2, 64, 64)
    assert torch.equal(model(images), model(changed))


@pytest.mark.parametrize("name", ["small_cnn", "vgg_like"])
def test_from_scratch_models_have_no_imagenet_weights(name):
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model(name, 2, weights="imagenet")


@pytest.mark.parametrize("name, probe", [("resnet50", "conv1"), ("resnet18+meta", "metadata_encoder.0")])
def test_local_checkpoint_loads_backbone_and_skips_a_head_of_another_label_set(tmp_path, name, probe):
    source = build_model(name, num_labels=14, weights="none")
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pth")
    model = build_model(name, num_labels=1, weights=str(tmp_path / "ckpt.pth"))
    assert torch.equal(model.get_submodule(probe).weight, source.get_submodule(probe).weight)
    images, _, metadata = tiny_batch()
    assert model(*((images, metadata) if uses_metadata(name) else (images,))).shape == (2, 1)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save(build_model("small_cnn", 2).state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match="does not fit"):
        build_model("resnet50", 2, weights=str(tmp_path / "small.pth"))
