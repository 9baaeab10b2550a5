"""Model registry: every model trains a few steps, knowledge-transfer freezing, the attention
DenseNets (report 004's weight counts, maps, what g does), metadata fusion, partial VGG16 transfer,
the 24-layer pneumonia CNN, the VGG-like net, local checkpoints, RMSProp."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cxr_pipeline.training.explain.gradcam import class_activation_map, target_layer
from cxr_pipeline.training.loop.schedules import OPTIMIZERS, build_optimizer
from cxr_pipeline.training.models.fusion import AGE_MEAN, AGE_STD, METADATA_WIDTH, metadata_features
from cxr_pipeline.training.models.registry import (MODELS, build_model, head_name, in_head, set_backbone_trainable,
                                                   uses_metadata)

NUM_LABELS = 3
IMAGE_SIZE = 64  # tiny_batch's; only pneumonia_cnn24 is built for one size
VGG16_UPPER_CONVS = [f"features.{i}" for i in (10, 12, 14, 17, 19, 21, 24, 26, 28)]
# What knowledge transfer trains, written out rather than read from the registry.
KT_TRAINS = {
    "densenet121": ["classifier"],
    "densenet121_attA": ["attention", "classifier"],
    "densenet121_attB": ["attention", "classifier"],
    "densenet121_attA_g": ["attention", "classifier"],
    "densenet121_attB_g": ["attention", "classifier"],
    "pneumonia_cnn24": ["separable", "classifier"],
    "resnet18": ["fc"],
    "resnet18_half": ["fc"],
    "resnet50": ["fc"],
    "small_cnn": ["classifier"],
    "vgg16_partial": VGG16_UPPER_CONVS + ["classifier"],
    "vgg_like": ["classifier"],
}
KT_TRAINS.update({f"{name}+meta": [f"backbone.{p}" for p in prefixes] + ["metadata_encoder", "head"]
                  for name, prefixes in list(KT_TRAINS.items())})
# Report 004's attention DenseNets: parameters no output depends on, frozen in every stage.
REPORT_ATTENTION = ["densenet121_attA", "densenet121_attB"]
NEVER_TRAINED = {
    "densenet121_attA": ["features.denseblock4", "features.norm5"],
    "densenet121_attB": ["features.denseblock4", "features.norm5"] + [f"attention.{i}.u_global" for i in range(3)],
}
NEVER_TRAINED.update({f"{name}+meta": [f"backbone.{p}" for p in prefixes]
                      for name, prefixes in list(NEVER_TRAINED.items())})


def never_trained(name: str, parameter_name: str) -> bool:
    return in_head(parameter_name, tuple(NEVER_TRAINED.get(name, ())))


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
    model = build_model(name, NUM_LABELS, "none", image_size=IMAGE_SIZE)
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
        # every trainable parameter is used (DDP needs that) and gets a finite gradient
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        assert all(p.requires_grad != never_trained(name, n) for n, p in model.named_parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("name", sorted(MODELS))
def test_knowledge_transfer_trains_only_the_head(name):
    with torch.device("meta"):  # parameters without storage: only their names and flags matter here
        model = build_model(name, NUM_LABELS, "none", image_size=IMAGE_SIZE)
    set_backbone_trainable(model, name, trainable=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if any(n.startswith(p + ".") for p in KT_TRAINS[name]) and not never_trained(name, n)}
    assert trainable == expected and 0 < len(trainable) < len(list(model.parameters()))
    set_backbone_trainable(model, name, trainable=True)
    assert all(p.requires_grad != never_trained(name, n) for n, p in model.named_parameters())


def test_head_modules_of_an_attention_model_leave_its_backbone_out():
    """train.py keeps the frozen backbone's BatchNorm in eval mode: modules outside the head."""
    with torch.device("meta"):
        model = build_model("densenet121_attA", NUM_LABELS)
    head_modules = [n for n, _ in model.named_modules() if in_head(n, head_name("densenet121_attA"))]
    assert "classifier" in head_modules and "attention.2.project" in head_modules
    assert not any(n.startswith("features") for n in head_modules)


@pytest.mark.parametrize("name", ["densenet121_attA", "densenet121_attB", "densenet121_attA_g", "densenet121_attB_g"])
def test_attention_maps_are_distributions_over_transition_positions_and_train(name):
    torch.manual_seed(0)
    model = build_model(name, NUM_LABELS)
    images, targets, _ = tiny_batch()
    nn.functional.binary_cross_entropy_with_logits(model(images), targets).backward()
    scorers = [a.u_local if name == "densenet121_attB" else a.u for a in model.attention]
    for attention, u in zip(model.attention, scorers):  # from the zero start (uniform maps) the gradient moves u
        assert u.grad.abs().sum() > 0
        if "attA" in name:
            assert attention.project.weight.grad.abs().sum() > 0

    with torch.no_grad():
        for u in scorers:
            u.normal_()
        model(images)
    assert [tuple(m.shape) for m in model.last_attention] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]  # 64 / 8, 16, 32
    for attention_map in model.last_attention:
        assert torch.allclose(attention_map.sum(dim=(1, 2)), torch.ones(2)) and attention_map.min() >= 0
        assert attention_map.std() > 0

    cam = class_activation_map(model, target_layer(model, name), images, 1)
    assert cam.shape == (2, 64, 64)


@pytest.mark.parametrize("name, weights", [
    ("densenet121", 6_969_231),
    ("densenet121_attA", 7_920_527), ("densenet121_attB", 6_971_279),  # report 004, Table 2
    ("densenet121_attA_g", 7_935_887), ("densenet121_attB_g", 6_986_639),  # + the classifier's 1024 x 15 for g
])
def test_densenet_weight_counts_with_15_outputs_match_report_004(name, weights):
    with torch.device("meta"):
        model = build_model(name, 15)
    assert sum(p.numel() for p in model.parameters()) == weights  # frozen ones included


@pytest.fixture
def single_rank_group(tmp_path):
    """A one-process gloo group: enough for DDP to check that every trainable parameter got a gradient."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name", REPORT_ATTENTION + ["densenet121_attB+meta"])
def test_report_attention_models_fine_tune_under_ddp_with_only_the_unused_frozen(name, single_rank_group):
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = build_model(name, NUM_LABELS)
    set_backbone_trainable(model, name, trainable=True)  # fine-tuning unfreezes all but what nothing depends on
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        n for n, _ in model.named_parameters() if never_trained(name, n)}
    images, targets, metadata = tiny_batch()
    inputs = (images, metadata) if uses_metadata(name) else (images,)
    ddp = DistributedDataParallel(model)  # raises on the second step if a trainable parameter got no gradient
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(ddp(*inputs), targets).backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def report_equations(model, images):
    """Report 004's equations 2-5 written out, g in every score: (logits, g)."""
    taps, x = [], images
    for name, layer in model.features.named_children():
        x = layer(x)
        if name.startswith("transition"):
            taps.append(x)
    g = F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1)
    pooled = []
    for attention, local in zip(model.attention, taps):
        if hasattr(attention, "project"):  # A: <u, l'_i + g>, pooling the projected l'_i
            local = attention.project(local)
            scores = torch.einsum("c,nchw->nhw", attention.u, local + g[:, :, None, None])
        else:  # B: <u, (l_i, g)> with u = (u_local, u_global)
            scores = torch.einsum("c,nchw->nhw", attention.u_local, local) + (g @ attention.u_global)[:, None, None]
        weights = F.softmax(scores.flatten(1), dim=1)
        pooled.append(torch.einsum("np,ncp->nc", weights, local.flatten(2)))
    return model.classifier(torch.cat(pooled, 1)), g


@pytest.mark.parametrize("name", REPORT_ATTENTION)
def test_report_attention_models_give_the_report_s_logits_whatever_g_is(name):
    """The models leave g out of the scores (and skip computing it): the report's equations, with g in,
    give the same logits, and still do after g changes."""
    torch.manual_seed(0)
    model = build_model(name, NUM_LABELS).eval()
    images = tiny_batch()[0]
    with torch.no_grad():
        for parameter in model.attention.parameters():
            if parameter.dim() == 1:  # u, u_local, u_global: away from zero, so g weighs in the scores
                parameter.normal_(std=0.1)
        logits = model(images)
        reference, g = report_equations(model, images)
        model.features.norm5.weight.mul_(2.0)
        model.features.norm5.bias.add_(0.5)
        changed, other_g = report_equations(model, images)
        assert torch.equal(model(images), logits)
    assert (g - other_g).abs().max() > 0.1
    assert torch.allclose(logits, reference, atol=1e-5) and torch.allclose(logits, changed, atol=1e-5)


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


@pytest.mark.parametrize("image_size", [64, 224])
def test_pneumonia_cnn24_maps_images_of_the_size_it_was_built_for_to_logits(image_size):
    torch.manual_seed(0)
    model = build_model("pneumonia_cnn24", 1, image_size=image_size).eval()
    assert model(torch.randn(1, 3, image_size, image_size)).shape == (1, 1)
    with pytest.raises(ValueError, match="image_size="):
        model(torch.randn(1, 3, 96, 96))


def test_pneumonia_cnn24_has_24_keras_layers_and_the_weights_they_add_up_to():
    def conv(inputs, outputs):  # 3x3, with bias
        return 9 * inputs * outputs + outputs

    def separable(inputs, outputs):  # depthwise 3x3 without bias, pointwise 1x1 with bias
        return 9 * inputs + inputs * outputs + outputs

    def dense(inputs, outputs):
        return inputs * outputs + outputs

    for image_size, labels in ((64, 1), (224, 1), (224, 2)):
        with torch.device("meta"):
            model = build_model("pneumonia_cnn24", labels, image_size=image_size)
        expected = (conv(3, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128)
                    + separable(128, 256) + 2 * separable(256, 256) + separable(256, 512) + 2 * separable(512, 512)
                    + 2 * (256 + 256 + 512 + 512)  # BatchNorm scale and shift (Keras also counts its two statistics)
                    + dense(512 * (image_size // 16) ** 2, 1024) + dense(1024, 512) + dense(512, labels))
        assert sum(p.numel() for p in model.parameters()) == expected
    assert expected == 104_389_314
    # Keras counts each conv with its ReLU as one layer: every module but the ReLUs
    layers = [m for part in (model.features, model.separable, model.classifier) for m in part
              if not isinstance(m, nn.ReLU)]
    assert len(layers) == 24


def test_pneumonia_cnn24_takes_vgg16_weights_in_its_first_four_convs(monkeypatch):
    from torchvision.models import VGG16_Weights, vgg16

    torch.manual_seed(0)
    fake_imagenet = vgg16(weights=None).state_dict()  # VGG16's names and shapes, random values, no download
    monkeypatch.setattr(VGG16_Weights, "get_state_dict", lambda self, **kwargs: fake_imagenet)
    model = build_model("pneumonia_cnn24", 1, "imagenet", image_size=64)
    for index in (0, 2, 5, 7):  # conv1_1, conv1_2, conv2_1, conv2_2
        layer = model.features[index]
        assert torch.equal(layer.weight, fake_imagenet[f"features.{index}.weight"])
        assert torch.equal(layer.bias, fake_imagenet[f"features.{index}.bias"])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1)

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


def test_rmsprop_has_keras_defaults_and_ignores_sgd_momentum():
    weight = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = build_optimizer("rmsprop", [weight], lr=0.01, momentum=0.9)
    assert "rmsprop" in OPTIMIZERS and isinstance(optimizer, torch.optim.RMSprop)
    group = optimizer.param_groups[0]
    assert (group["alpha"], group["eps"], group["momentum"], group["centered"]) == (0.9, 1e-7, 0, False)
    gradient = torch.tensor([0.5, -4.0])
    weight.grad = gradient.clone()
    optimizer.step()
    # from a zero accumulator: v = 0.1 g^2 and w -= lr g / (sqrt(v) + eps), a step of lr / sqrt(0.1) per weight
    expected = torch.tensor([1.0, -2.0]) - 0.01 * gradient / (torch.sqrt(0.1 * gradient ** 2) + 1e-7)
    assert torch.allclose(weight.detach(), expected)
