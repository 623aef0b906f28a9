"""Mask evolution: IoU, ITOP rate, swaps and the interval records on mask sequences with known answers."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bidst import evolution
from bidst.errors import BidstError


def m(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_iou_known_values():
    assert evolution.iou(m(1, 1, 0, 0), m(0, 1, 1, 0)) == pytest.approx(1 / 3)
    assert evolution.iou(m(1, 0), m(1, 0)) == 1.0
    assert evolution.iou(m(1, 0), m(0, 1)) == 0.0
    assert evolution.iou(m(0, 0), m(0, 0)) == 1.0  # two empty masks are the same mask


def test_model_iou_pools_layers_instead_of_averaging():
    a = {"a": m(1, 1, 0, 0), "b": m(*[1] * 8, 0, 0)}
    b = {"a": m(0, 1, 1, 0), "b": m(*[1] * 8, 0, 0)}
    out = evolution.model_iou(a, b)
    assert out["a"] == pytest.approx(1 / 3) and out["b"] == 1.0
    assert out["__all__"] == pytest.approx(9 / 11)  # (1 + 8) / (3 + 8), not (1/3 + 1) / 2


def test_mismatched_masks_are_an_error():
    with pytest.raises(BidstError, match="different layers"):
        evolution.model_iou({"a": m(1)}, {"b": m(1)})
    with pytest.raises(BidstError, match="shape"):
        evolution.swaps({"a": m(1)}, {"a": m(1, 0)})


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40), st.integers(1, 39))
def test_model_iou_all_equals_iou_of_concatenation(pairs, cut):
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    cut = min(cut, len(pairs))
    out = evolution.model_iou({"x": a[:cut], "y": a[cut:]}, {"x": b[:cut], "y": b[cut:]})
    assert out["__all__"] == pytest.approx(evolution.iou(a, b))
    assert 0.0 <= out["__all__"] <= 1.0 and evolution.iou(a, b) == evolution.iou(b, a)


def test_itop_rate_counts_weights_ever_active():
    tracker = evolution.ItopTracker()
    tracker.update({"a": m(1, 0, 0, 0), "b": m(1, 1)})
    tracker.update({"a": m(0, 1, 0, 0), "b": m(1, 1)})
    tracker.update({"a": m(1, 0, 0, 0), "b": m(1, 1)})
    assert tracker.rate() == {"a": 0.5, "b": 1.0, "__all__": pytest.approx(4 / 6)}
    resumed = evolution.ItopTracker()
    resumed.load_state_dict(tracker.state_dict())
    resumed.update({"a": m(0, 0, 0, 1), "b": m(1, 1)})
    assert resumed.rate()["a"] == 0.75


def test_swaps_and_density():
    old = {"a": m(1, 1, 0, 0), "b": m(1, 0)}
    new = {"a": m(0, 1, 1, 1), "b": m(1, 0)}
    assert evolution.swaps(old, new) == {"a": 2, "b": 0, "__all__": 2}
    assert evolution.density(new) == {"a": 0.75, "b": 0.5, "__all__": pytest.approx(4 / 6)}


def rolling_masks(epoch: int) -> dict[str, torch.Tensor]:
    """Layer "a": one active weight that moves one place per epoch; layer "b" never changes."""
    a = torch.zeros(8, dtype=torch.bool)
    a[epoch % 8] = True
    return {"a": a, "b": m(1, 1, 0, 0)}


def drive(tracker: evolution.MaskEvolution, epochs: range) -> list[dict]:
    records = []
    for epoch in epochs:
        if epoch > 0:
            tracker.topology_change(rolling_masks(epoch - 1), rolling_masks(epoch))
        records.append(tracker.update(rolling_masks(epoch), epoch))
    return records


def test_mask_evolution_records_intervals_itop_and_swaps():
    records = drive(evolution.MaskEvolution(interval=2), range(5))
    assert [r.get("iou_interval") for r in records] == [None, None, [0, 2], None, [2, 4]]
    assert records[2]["iou"] == {"a": 0.0, "b": 1.0, "__all__": pytest.approx(2 / 4)}
    assert [r["itop"]["a"] for r in records] == [1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8]
    assert records[0]["swaps"] == {"__all__": 0} and records[0]["commits"] == 0
    assert records[1]["swaps"] == {"a": 1, "b": 0, "__all__": 1} and records[1]["commits"] == 1
    assert records[4]["density"]["__all__"] == pytest.approx(3 / 12)
    assert all(r["kind"] == "mask" for r in records)
    json.dumps(records)  # every record is JSON-able


def test_mask_evolution_resume_equals_uninterrupted(tmp_path):
    straight = drive(evolution.MaskEvolution(interval=3), range(8))
    first = evolution.MaskEvolution(interval=3)
    head = drive(first, range(4))
    torch.save(first.state_dict(), tmp_path / "evo.pt")
    second = evolution.MaskEvolution()
    second.load_state_dict(torch.load(tmp_path / "evo.pt", weights_only=True))
    tail = drive(second, range(4, 8))
    assert head + tail == straight


def test_interval_must_be_positive():
    with pytest.raises(BidstError):
        evolution.MaskEvolution(interval=0)


def test_training_loop_wiring_with_the_engine():
    """The calls the recipe makes: shapes once, cost per step, swaps per commit, a record per epoch."""
    from torch import nn

    import bidst
    from bidst import flops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    sp = bidst.sparsify(model, optimizer, "rigl", 0.75, total_steps=12, distribution="uniform", interval=2)
    shapes = flops.layer_shapes(model, x)
    assert set(sp.masks) <= set(shapes)  # mask keys and FLOPs keys are the same qualified names
    meter, evo = flops.CostMeter(), evolution.MaskEvolution(interval=2)
    records = [evo.update(sp.masks, 0)]
    for step in range(12):
        with meter.time("forward"):
            loss = nn.functional.cross_entropy(model(x), y)
        with meter.time("backward"):
            optimizer.zero_grad()
            loss.backward()
        old = {n: m.clone() for n, m in sp.masks.items()}
        with meter.time("update"):
            changed = sp.step()
        meter.add_train_step(shapes, old, batch=len(y))
        if changed:
            assert evo.topology_change(old, sp.masks)["__all__"] > 0
        if step % 3 == 2:
            records.append(evo.update(sp.masks, (step + 1) // 3))
    summary = meter.summary(extra_flops=sp.costs)
    own_work = sum(sp.costs.values()) / summary["flops"]["dense_reference"]  # the methods' own FLOPs
    assert summary["flops"]["relative_to_dense"] == pytest.approx(0.25 + own_work, abs=0.01)  # 75% sparse
    assert records[-1]["itop"]["__all__"] > records[0]["itop"]["__all__"] == pytest.approx(0.25, abs=0.01)
    assert [r.get("iou_interval") for r in records] == [None, None, [0, 2], None, [2, 4]]
    json.dumps(records)
    json.dumps(summary)


def test_pooled_itop_and_iou_leave_out_layers_kept_dense():
    """A layer kept dense is all explored and never changes: pooled in, it lifted the overall ITOP rate and IoU."""
    sparse0 = torch.tensor([True, False, False, False])
    sparse1 = torch.tensor([False, True, False, False])
    dense = torch.ones(4, dtype=torch.bool)
    evo = evolution.MaskEvolution(interval=1, pooled=["s"])
    first = evo.update({"s": sparse0, "d": dense}, 0)
    evo.commit({"s": 1}, {"s": sparse1, "d": dense})
    second = evo.update({"s": sparse1, "d": dense}, 1)
    assert first["itop"]["__all__"] == 0.25 and second["itop"]["__all__"] == 0.5 and second["itop"]["d"] == 1.0
    assert second["iou"]["__all__"] == 0.0 and second["iou"]["d"] == 1.0
    assert second["density"]["__all__"] == pytest.approx(5 / 8)  # density keeps every layer


@pytest.mark.parametrize("initial_sparsity", [0.0, 0.5])
def test_swaps_count_positions_newly_active_in_a_step(initial_sparsity):
    """GraNet prunes to its schedule, then regrows among all inactive positions, the just-pruned included: a weight
    pruned and regrown in one step is no swap (from a dense start every 'swap' of the first prune was one)."""
    from torch import nn

    import bidst

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bidst.sparsify(model, optimizer, "granet", 0.8, total_steps=40, interval=5, initial_sparsity=initial_sparsity)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    commits = 0
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        old = {n: m.clone() for n, m in sp.masks.items()}
        if sp.step():
            commits += 1
            true = evolution.swaps(old, sp.masks)
            assert sum(sp.last_swaps.values()) == true["__all__"]
            assert all(sp.last_swaps.get(n, 0) == k for n, k in true.items() if n != "__all__")
    assert commits >= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_and_meter():
    from bidst import flops

    tracker = evolution.MaskEvolution(interval=1)
    cpu = rolling_masks(0)
    tracker.update({n: m.cuda() for n, m in cpu.items()}, 0)
    record = tracker.update({n: m.cuda() for n, m in rolling_masks(1).items()}, 1)
    assert record["iou"]["b"] == 1.0 and record["itop"]["a"] == 2 / 8
    assert evolution.model_iou(cpu, {n: m.cuda() for n, m in cpu.items()})["__all__"] == 1.0
    meter = flops.CostMeter("cuda")
    with meter.time("forward"):
        torch.ones(1024, 1024, device="cuda").sum()
    assert meter.totals()["time"]["forward"] > 0 and meter.peak_memory() >= 4 * 1024 * 1024
