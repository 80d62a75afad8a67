from __future__ import annotations

import io
import json
import math

import pytest
import torch

from nestedtrain.methods.conditions import (
    CONDITIONS,
    EMA,
    GradSlope,
    LossDecrease,
    RandomA,
    RandomB,
    ValLoss,
    build_condition,
    mean_motivated_steps,
)


def run(condition, values, key=None):
    if key is None:
        return [condition.update(v) for v in values]
    return [condition.update(1.0, **{key: v}) for v in values]


def test_loss_decrease_switches_where_algorithm_1_says():
    # k = 2; the first loss improves on +inf, as Algorithm 1 starts with prev_loss = +inf.
    losses = [5, 4, 3, 3.5, 3, 2, 1, 1, 0.5]
    expected = [False, True, True, False, False, True, True, False, False]
    assert run(LossDecrease(2), losses) == expected


def algorithm_1(epochs: list[list[float]], k: int) -> list[bool]:
    """Algorithm 1 of the Motivation paper, transcribed: which steps train the motivated
    model."""
    motivated, prev_loss, consecutive_improve, flags = False, math.inf, 0, []
    for losses in epochs:
        for loss in losses:
            flags.append(motivated)
            consecutive_improve = consecutive_improve + 1 if loss < prev_loss else 0
            motivated = consecutive_improve >= k
            prev_loss = loss
        motivated = False  # every epoch ends on the base model
    return flags


def trainer_loop(condition, epochs: list[list[float]]) -> list[bool]:
    flags, motivated = [], False
    for losses in epochs:
        for loss in losses:
            flags.append(motivated)
            motivated = condition.update(loss)
        condition.on_epoch_end()
        motivated = False
    return flags


@pytest.mark.parametrize("k", [1, 2, 3])
def test_loss_decrease_in_a_trainer_loop_equals_algorithm_1(k):
    g = torch.Generator().manual_seed(k)
    # A noisy falling loss: streaks of every length, across epoch boundaries too.
    steps = torch.randn(100, generator=g) * 0.3 - 0.05
    losses = (3.0 + steps.cumsum(0)).tolist()
    epochs = [losses[i : i + 25] for i in range(0, 100, 25)]
    flags = trainer_loop(LossDecrease(k), epochs)
    assert flags == algorithm_1(epochs, k)
    assert 0 < sum(flags) < 100


def test_loss_decrease_keeps_its_streak_over_the_epoch_end():
    condition = LossDecrease(2)
    flags = trainer_loop(condition, [[3, 2, 1], [0.5, 0.4, 0.6]])
    # Epoch 1 ends with a streak of 3 but epoch 2 starts on the base model; its first loss
    # still improves on the last loss of epoch 1, so the streak (4) motivates step 2.
    assert flags == [False, False, True, False, True, True]
    assert condition.consecutive == 0 and condition.previous == 0.6


def test_ema_counts_drops_larger_than_the_threshold():
    condition = EMA(2, alpha=0.5, threshold=0.1)
    # EMAs: 10, 9.5 (a 5% drop: too small), 6.75, 5.375, 7.1875
    assert run(condition, [10, 9, 4, 4, 9]) == [False, False, False, True, False]
    assert condition.ema == pytest.approx(7.1875)
    default = EMA(3)
    assert (default.alpha, default.threshold) == (0.02, 0.002)


def test_val_loss_follows_the_held_out_loss_not_the_training_loss():
    condition = ValLoss(1)
    flags = [condition.update(loss, val_loss=v) for loss, v in zip([1, 2, 3, 4], [3, 2, 2, 1])]
    assert flags == [True, True, False, True]
    assert condition.needs == {"val_loss"}
    with pytest.raises(ValueError, match="val_loss"):
        condition.update(1.0)


def test_grad_slope_needs_the_norm_rising_k_steps_in_a_row():
    condition = GradSlope(2)
    flags = run(condition, [1, 2, 3, 2, 5, 6], key="grad_norm")
    assert flags == [False, True, True, False, False, True]
    with pytest.raises(ValueError, match="grad_norm"):
        condition.update(1.0, val_loss=2.0)


def random_epochs(condition, epochs: int, steps: int) -> list[list[bool]]:
    out = []
    for _ in range(epochs):
        out.append([condition.update(1.0) for _ in range(steps)])
        condition.on_epoch_end()
    return out


def test_random_a_is_reproducible_and_keeps_its_counts_in_range():
    def make(seed):
        return RandomA(20, torch.Generator().manual_seed(seed), max_activations=6)

    flags = random_epochs(make(0), epochs=8, steps=20)
    assert flags == random_epochs(make(0), epochs=8, steps=20)
    assert flags != random_epochs(make(1), epochs=8, steps=20)
    counts = [sum(epoch) for epoch in flags]
    assert all(0 <= c <= 6 for c in counts) and len(set(counts)) > 1
    # update() says whether the *next* step is motivated, so the last call of an epoch is
    # never true: every epoch starts on the base model.
    assert not any(epoch[-1] for epoch in flags)
    assert (
        random_epochs(RandomA(20, torch.Generator(), max_activations=0), 2, 20)
        == [[False] * 20] * 2
    )


def test_random_b_motivates_the_requested_number_of_steps_per_epoch():
    condition = RandomB(10, torch.Generator().manual_seed(0), counts=[3, 0, 9.6])
    flags = random_epochs(condition, epochs=3, steps=10)
    assert [sum(epoch) for epoch in flags] == [3, 0, 9]  # 9.6 -> 10, capped at 9 (step 0)
    with pytest.raises(ValueError, match="epoch 4"):
        condition.update(1.0)


def test_random_b_averages_earlier_runs_metrics(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"epoch": 1, "motivated_steps": 9, "loss": 1.0},
                {"epoch": 0, "motivated_steps": 2},
                {"step": 5, "loss": 0.3},  # a line of another kind
                {"epoch": 1, "motivated_steps": 4},  # a resumed run logged epoch 1 again
            ]
        )
    )
    second.write_text(
        "\n".join(json.dumps({"epoch": e, "motivated_steps": c}) for e, c in enumerate([4, 5, 7]))
    )
    assert mean_motivated_steps([first, second]) == [3.0, 4.5, 7.0]
    condition = build_condition(
        "random_b", 3, 10, torch.Generator().manual_seed(0), counts_from=[str(first), second]
    )
    assert condition.counts == [3, 5, 7]
    assert [sum(e) for e in random_epochs(condition, epochs=3, steps=10)] == [3, 5, 7]
    (tmp_path / "ct.jsonl").write_text(json.dumps({"epoch": 0, "loss": 1.0}))
    with pytest.raises(ValueError, match="motivated_steps"):
        RandomB(10, torch.Generator(), counts_from=[tmp_path / "ct.jsonl"])
    with pytest.raises(ValueError, match="exactly one"):
        RandomB(10, torch.Generator())


def saved_and_loaded(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", CONDITIONS)
def test_state_dict_round_trip_resumes_identically(name):
    def make(seed: int = 0):
        opts = {"random_b": {"counts": [4, 6, 2, 5]}, "ema": {"alpha": 0.5}}.get(name, {})
        return build_condition(name, 2, 12, torch.Generator().manual_seed(seed), **opts)

    g = torch.Generator().manual_seed(3)
    values = (2.0 + torch.randn(48, generator=g).cumsum(0) * 0.2).tolist()

    def feed(condition, chunk, start):
        flags = []
        for i, v in enumerate(chunk, start):
            flags.append(condition.update(v, val_loss=v * 1.1, grad_norm=-v))
            if (i + 1) % 12 == 0:
                condition.on_epoch_end()
        return flags

    uninterrupted = feed(make(), values, 0)
    first = make()
    flags = feed(first, values[:17], 0)  # stop mid-epoch
    resumed = make(seed=99)  # a different generator: the saved state must win
    resumed.load_state_dict(saved_and_loaded(first.state_dict()))
    flags += feed(resumed, values[17:], 17)
    assert flags == uninterrupted
    assert any(uninterrupted)
    with pytest.raises(ValueError, match="cannot load"):
        other = "ema" if name != "ema" else "loss_decrease"
        build_condition(other, 2, 12, torch.Generator()).load_state_dict(first.state_dict())


def test_build_condition_names_and_options():
    g = torch.Generator()
    built = {name: build_condition(name, 3, 10, g) for name in CONDITIONS if name != "random_b"}
    assert isinstance(built["loss_decrease"], LossDecrease) and built["loss_decrease"].k == 3
    assert isinstance(built["ema"], EMA)
    assert isinstance(built["val_loss"], ValLoss)
    assert isinstance(built["grad_slope"], GradSlope)
    assert isinstance(built["random_a"], RandomA)
    assert build_condition("ema", 1, 10, g, alpha=0.1).alpha == 0.1
    with pytest.raises(ValueError, match="loss_decrease"):
        build_condition("loss_falls", 3, 10, g)
    with pytest.raises(ValueError, match="alpha"):
        build_condition("loss_decrease", 3, 10, g, alpha=0.1)
    with pytest.raises(ValueError, match="k must be"):
        build_condition("loss_decrease", 0, 10, g)
