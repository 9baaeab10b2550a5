"""--amp and --channels-last (training/loop/precision.py) on CPU: autocast, the fp16 gradient scaler, layout."""
import pytest
import torch

from cxr_pipeline.training.loop import precision as precision_module
from cxr_pipeline.training.loop.precision import Precision
from cxr_pipeline.training.models.registry import build_model

CPU = torch.device("cpu")


def conv_weights(model):
    return [p for p in model.parameters() if p.dim() == 4]


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("off", torch.float32)])
def test_forward_runs_in_the_chosen_dtype_and_parameters_stay_float32(amp, dtype):
    precision = Precision(amp, channels_last=False, device=CPU)
    model = build_model("small_cnn", 3, "none")
    with precision.autocast():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.dtype == dtype
    assert precision.forward(model, torch.randn(2, 3, 32, 32)).dtype == torch.float32  # what losses get
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert precision.scaler.is_enabled() == (amp == "fp16")  # bf16 needs no loss scaling


def test_evaluation_runs_in_float32_whatever_amp_says():
    """What a run reports on val and test is what predict computes (float32), not its bf16 training forward."""
    model = build_model("small_cnn", 3, "none").eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
        assert torch.equal(Precision("bf16", channels_last=False, device=CPU).evaluate(model, images), plain)
        assert not torch.equal(Precision("bf16", channels_last=False, device=CPU).forward(model, images), plain)


@pytest.mark.parametrize("native, warned", [(False, True), (True, False), (None, False)])
def test_bf16_on_a_cpu_that_would_emulate_it_says_to_use_float32(monkeypatch, caplog, native, warned):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="train"):
        Precision("bf16", channels_last=False, device=CPU)
        Precision("off", channels_last=False, device=CPU)  # float32 never warns
    assert ("use --amp off" in caplog.text) == warned and len(caplog.records) == int(warned)


def test_channels_last_lays_out_model_and_images():
    precision = Precision("off", channels_last=True, device=CPU)
    model = precision.prepare_model(build_model("resnet18", 2, "none"))
    images = precision.prepare_images(torch.randn(2, 3, 32, 32))
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(model))
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()


def test_fp16_scaler_steps_on_finite_gradients_and_skips_overflowing_ones():
    torch.manual_seed(0)
    precision = Precision("fp16", channels_last=False, device=CPU)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = torch.randn(8, 4)

    before = model.weight.detach().clone()
    precision.backward_and_step(model(inputs).pow(2).mean(), optimizer)
    assert not torch.equal(model.weight, before) and precision.scaler.get_scale() == 2.0**16

    optimizer.zero_grad()
    before = model.weight.detach().clone()
    precision.backward_and_step(model(inputs).mean() * float("inf"), optimizer)
    assert torch.equal(model.weight, before)  # the step with inf gradients was skipped
    assert precision.scaler.get_scale() == 2.0**15  # and the scale backed off


def test_scaler_state_round_trips_through_a_checkpoint_and_unknown_modes_are_refused():
    first = Precision("fp16", channels_last=False, device=CPU)
    model = torch.nn.Linear(2, 1)
    first.backward_and_step(model(torch.ones(1, 2)).sum() * float("inf"), torch.optim.SGD(model.parameters(), 0.1))
    second = Precision("fp16", channels_last=False, device=CPU)
    second.load_state_dict(first.state_dict())
    assert second.scaler.get_scale() == first.scaler.get_scale() == 2.0**15
    Precision("off", False, CPU).load_state_dict({})  # checkpoints of runs without a scaler
    with pytest.raises(ValueError, match="--amp must be one of"):
        Precision("fp8", False, CPU)


def test_gpu_benchmark_code_runs_both_inputs_on_the_cpu(nih_dataset):
    """benchmarks/gpu.py as a smoke test: its figure needs a GPU, its code does not."""
    from benchmarks.gpu import measure

    rates = measure(nih_dataset, "small_cnn", batch_size=4, steps=3, warmup=1, amp="bf16", channels_last=True,
                    device=CPU)
    assert rates["device"] == "cpu" and rates["loader"] > 0 and rates["synthetic"] > 0
