"""FLOPs and cost meter: hand-computed counts for Linear, Conv and a small model, dense and masked."""

import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bidst
from bidst import flops
from bidst.budget import model_rows
from bidst.errors import BidstError


def test_linear_dense_and_masked():
    layer = nn.Linear(4, 3)
    shapes = flops.layer_shapes(layer, torch.randn(5, 4))
    s = shapes["weight"]
    assert (s.kind, s.in_features, s.out_features, s.positions, s.batch, s.numel) == ("linear", 4, 3, 1, 5, 12)
    assert flops.forward_flops(s, 12) == 2 * 12 * 5  # 12 multiply-adds per sample, batch 5
    mask = {"weight": torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)}
    assert flops.train_step_flops(shapes, mask) == {"forward": 70.0, "backward": 140.0}
    assert flops.sampled_grad_flops(shapes, {"weight": 3}) == 2 * 3 * 5
    assert flops.dense_grad_flops(shapes, masks=mask) == 120.0
    assert flops.dense_grad_flops(shapes, batch=1, masks=mask) == 24.0
    # a layer at density 1 takes no dense gradient beyond its ordinary one (it was counted again)
    assert flops.dense_grad_flops(shapes, masks={"weight": mask["weight"] | True}) == 0
    assert flops.dense_grad_flops(shapes) == 120.0  # without masks: every layer
    assert flops.momentum_flops(shapes) == 24.0
    assert flops.inference_flops(shapes, mask) == 14.0


def test_linear_on_sequences_counts_every_position():
    shapes = flops.layer_shapes(nn.Linear(4, 3), torch.randn(2, 7, 4))
    assert shapes["weight"].positions == 7
    assert flops.inference_flops(shapes) == 2 * 12 * 7


def test_conv_with_stride_and_padding():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    s = flops.layer_shapes(conv, torch.randn(2, 3, 9, 9))["weight"]
    assert s.out_size == (5, 5) and s.in_size == (9, 9) and s.kernel == (3, 3) and s.numel == 216
    # per output element 3·3·3 = 27 MACs, 8·5·5 = 200 output elements, 2 samples
    assert flops.forward_flops(s, s.numel) == 2 * 27 * 200 * 2
    assert flops.forward_flops(s, 100) == 2 * 100 * 25 * 2


def test_grouped_conv():
    s = flops.layer_shapes(nn.Conv2d(4, 8, 3, padding=1, groups=2), torch.randn(1, 4, 6, 6))["weight"]
    # each output element sees 4/2 input channels · 9 taps = 18 MACs; 8·36 output elements
    assert s.groups == 2 and flops.forward_flops(s, s.numel) == 2 * 18 * 8 * 36


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 10),
    )


def test_small_model_dense_and_masked():
    model = small_model().train()
    shapes = flops.layer_shapes(model, torch.randn(3, 1, 8, 8))
    assert set(shapes) == {"0.weight", "5.weight"}
    assert model.training and model[1].training  # modes restored after the hooked pass
    conv, fc = 2 * 36 * 64, 2 * 640  # per sample: 36 weights × 64 positions, 640 weights × 1
    assert flops.inference_flops(shapes) == conv + fc
    assert flops.dense_train_step_flops(shapes) == 3 * 3 * (conv + fc)
    masks = {"0.weight": torch.zeros(4, 1, 3, 3, dtype=torch.bool), "5.weight": torch.zeros(10, 64, dtype=torch.bool)}
    masks["0.weight"].view(-1)[:18] = True
    masks["5.weight"].view(-1)[::10] = True
    assert flops.inference_flops(shapes, masks) == 2 * 18 * 64 + 2 * 64
    assert flops.active_counts(shapes, {"0.weight": masks["0.weight"]}) == {"0.weight": 18, "5.weight": 640}


def test_dense_counts_agree_with_torch_flop_counter():
    model = small_model()
    x = torch.randn(3, 1, 8, 8, requires_grad=True)  # so the first layer's input gradient is computed too
    shapes = flops.layer_shapes(model, x)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    counted = sum(n for op, n in by_op.items() if "convolution" in op or "mm" in op)
    assert counted == flops.dense_train_step_flops(shapes)


@pytest.mark.parametrize("unbatched", [False, True])
def test_transposed_and_unbatched_convolutions_agree_with_torch_flop_counter(unbatched):
    """A transposed convolution's weights each meet every input position: it was not counted at all (a filter_fn may
    sparsify it), and an unbatched conv input was read as a batch of its channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1), nn.Flatten(-2),
                          nn.ConvTranspose1d(4, 2, 3))
    x = torch.randn(1, 8, 8) if unbatched else torch.randn(3, 1, 8, 8, requires_grad=True)
    shapes = flops.layer_shapes(model, x)
    assert set(shapes) == {"0.weight", "2.weight", "4.weight"}
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward() if not unbatched else model(x)
    total = counter.get_total_flops()
    assert total == (flops.dense_train_step_flops(shapes) if not unbatched else flops.inference_flops(shapes))
    batch = 1 if unbatched else 3
    assert model_rows(model, x) == {"0.weight": 16 * batch, "2.weight": 16 * batch, "4.weight": 64 * batch}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    convs = lambda module, name: isinstance(module, (nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d))  # noqa: E731
    sp = bidst.sparsify(model, optimizer, "rigl", 0.8, total_steps=10, interval=2, filter_fn=convs)
    assert set(sp.params) == set(shapes)
    for _ in range(4):  # RigL trains them like any layer
        sp.optimizer.zero_grad()
        model(x).square().mean().backward()
        sp.step()
    assert sp.topology_changes > 0
    assert all(int(m.sum()) == sp.budgets[n] and not sp.params[n][~m].any() for n, m in sp.masks.items())


def test_reused_module_counts_each_call():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    s = flops.layer_shapes(Twice(), torch.randn(2, 4))["fc.weight"]
    assert s.positions == 2 and flops.forward_flops(s, 16) == 2 * 16 * 2 * 2


def test_a_tied_weight_counts_every_layer_at_its_mask():
    """A weight tied between two layers has one mask, named after its first layer; the second layer was counted
    as a dense layer of its own, so a sparse model's FLOPs came out too high (and match_flops left it out)."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Tied()
    shapes = flops.layer_shapes(model, torch.randn(3, 8))
    assert list(shapes) == ["a.weight"] and shapes["a.weight"].positions == 2
    sp = bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.75, total_steps=1)
    assert list(sp.masks) == ["a.weight"]
    assert flops.inference_flops(shapes, sp.masks) == 2 * 16 * 2  # 16 active weights, used twice per sample
    assert model_rows(model, torch.randn(3, 8)) == {"a.weight": 6}  # what match_flops plans with


def test_meter_accumulates_and_relates_to_dense():
    shapes = flops.layer_shapes(nn.Linear(4, 3), torch.randn(5, 4))
    mask = {"weight": torch.zeros(3, 4, dtype=torch.bool)}
    mask["weight"][0] = True  # 4 of 12 active
    meter = flops.CostMeter()
    for _ in range(2):
        meter.add_train_step(shapes, mask)
    meter.add("dense_grad", flops.dense_grad_flops(shapes, masks=mask))
    totals = meter.totals()
    assert totals["flops"] == {"forward": 80.0, "backward": 160.0, "dense_grad": 120.0, "total": 360.0}
    assert totals["dense_flops"] == 2 * 360.0
    assert meter.relative_to()["total"] == pytest.approx(0.5)
    assert meter.relative_to(360.0)["forward"] == pytest.approx(80 / 360)
    summary = meter.summary()
    assert summary["flops"]["relative_to_dense"] == pytest.approx(0.5)
    assert summary["flops"]["dense_reference"] == 720.0
    assert summary["peak_memory_bytes"] > 0
    with_method = meter.summary(extra_flops={"mask_learning": 36.0, "dense_grad": 120.0})
    assert with_method["flops"]["dense_grad"] == 240.0 and with_method["flops"]["mask_learning"] == 36.0
    assert with_method["flops"]["relative_to_dense"] == pytest.approx(516 / 720)
    assert meter.totals()["flops"]["total"] == 360.0  # the meter itself is unchanged
    whole = meter.summary(dense_total=1440.0)  # e.g. dense training of a schedule twice as long as this run
    assert whole["flops"]["dense_reference"] == 1440.0 and whole["flops"]["relative_to_dense"] == pytest.approx(0.25)
    with pytest.raises(BidstError):
        flops.CostMeter().relative_to()


def test_meter_nested_timers_are_exclusive():
    meter = flops.CostMeter()
    start = time.perf_counter()
    with meter.time("step"):
        time.sleep(0.02)
        with meter.time("mask_learning"):
            time.sleep(0.03)
    wall = time.perf_counter() - start
    t = meter.totals()["time"]
    assert t["mask_learning"] >= 0.03 and 0.02 <= t["step"] < 0.03 + 0.02
    assert t["total"] == pytest.approx(t["step"] + t["mask_learning"]) and t["total"] <= wall


def test_meter_state_dict_round_trips_through_a_safe_checkpoint(tmp_path):
    meter = flops.CostMeter()
    meter.add("forward", 10)
    meter.add_dense_reference(40)
    with meter.time("forward"):
        pass
    torch.save(meter.state_dict(), tmp_path / "m.pt")
    resumed = flops.CostMeter()
    resumed.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    resumed.add("forward", 10)
    assert resumed.totals()["flops"]["forward"] == 20.0
    assert resumed.relative_to()["total"] == 0.5
    assert resumed.totals()["time"] == meter.totals()["time"]


def test_mask_for_an_uncounted_weight_is_an_error():
    shapes = flops.layer_shapes(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2))
    with pytest.raises(BidstError, match="1.weight"):
        flops.inference_flops(shapes, {"1.weight": torch.ones(2, 2, dtype=torch.bool)})
