"""Per-epoch soft pruning (InfoBatch): the epoch's selection and loss weights, checked by hand."""
import numpy as np
import pytest

from shards.key_hash import key_draws
from trainer.example_pruning import plan_epoch, prunes_epoch

KEYS = np.array([f"k{i}" for i in range(8)], dtype=object)
# mean 0.45: k0, k1, k2, k3, k5 are below it (well-learned); k4, k6 above; k7 never presented
LOSSES = np.array([0.1, 0.2, 0.3, 0.4, 1.0, 0.05, 1.1, np.nan])


def test_pruned_epoch_matches_a_hand_computation():
    plan = plan_epoch(KEYS[::-1].copy(), LOSSES[::-1].copy(), epoch=2, epochs=8, ratio=0.4, anneal=0.25, seed=5)
    assert plan.keys.tolist() == KEYS.tolist()  # sorted, whatever order came in
    assert plan.threshold == pytest.approx(np.nanmean(LOSSES))
    well_learned = [0, 1, 2, 3, 5]
    draws = key_draws(KEYS[well_learned], 5, "infobatch@e2")  # the key-hash rule, seed 5, epoch 2
    left_out = sorted(np.array(well_learned)[np.argsort(draws)[:2]].tolist())  # round(0.4 * 5) = 2
    assert (~plan.kept).nonzero()[0].tolist() == sorted(left_out)
    expected = np.ones(8)
    expected[well_learned] = 1 / (1 - 0.4)
    expected[left_out] = 0.0
    assert plan.weights.tolist() == pytest.approx(expected.tolist())
    assert plan.kept[[4, 6, 7]].all(), "hard and never-presented examples always train"
    assert plan.weight_of() == {f"k{i}": pytest.approx(1 / 0.6) for i in well_learned if i not in left_out}


@pytest.mark.parametrize("epoch", [0, 6, 7])
def test_first_and_annealing_epochs_use_every_example_at_weight_one(epoch):
    # 8 epochs, anneal 0.25: epochs 6 and 7 anneal; epoch 0 has no scores to judge by
    plan = plan_epoch(KEYS, LOSSES, epoch=epoch, epochs=8, ratio=0.5, anneal=0.25, seed=0)
    assert plan.kept.all() and (plan.weights == 1).all() and not plan.pruned and plan.weight_of() == {}


def test_which_epochs_prune():
    assert [e for e in range(8) if prunes_epoch(e, 8, 0.125)] == [1, 2, 3, 4, 5, 6]
    assert [e for e in range(3) if prunes_epoch(e, 3, 0.125)] == [1, 2]  # round(0.375) = 0 annealing epochs
    assert [e for e in range(10) if prunes_epoch(e, 10, 0.0)] == list(range(1, 10))


def test_the_same_seed_gives_the_same_plan_and_another_epoch_another():
    first = plan_epoch(KEYS, LOSSES, 1, 8, 0.4, 0.0, seed=1)
    assert (first.kept == plan_epoch(KEYS, LOSSES, 1, 8, 0.4, 0.0, seed=1).kept).all()
    draws = {tuple(plan_epoch(KEYS, LOSSES, e, 8, 0.4, 0.0, seed=1).kept) for e in range(1, 8)}
    assert len(draws) > 1
