"""Every recipe, shrunk with --smoke, trains on CPU with its parallel layout scaled down."""

import math

import pytest

from helpers import SMALL, metrics, run_train

# (recipe, processes): the MoE recipes keep expert parallelism (EP 8 -> 2). The stage-2 recipes
# shrink to their stage-1 model; test_recipes checks that they load.
RECIPES = [("dense1b", 1), ("moe1b", 2), ("dense3b", 1), ("moe3b", 2)]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,nproc", RECIPES, ids=[r for r, _ in RECIPES])
def test_recipe_trains_shrunk(default_data, tmp_path, recipe, nproc):
    run_train(tmp_path, "smoke", [], nproc=nproc, recipe=recipe, flags=["--smoke"])
    train, valid = metrics(tmp_path / "smoke-smoke")  # --smoke runs are named <name>-smoke
    assert sorted(train) == list(range(1, 11))
    assert all(math.isfinite(v) for v in train.values())
    assert train[10] < train[1]
    assert list(valid) == [10]


STEPS = SMALL + ["train.tokens=10240", "schedule.warmup=0"]


@pytest.fixture(scope="module")
def plain(default_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    run_train(out, "plain", STEPS)
    return metrics(out / "plain")[0]


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_gives_the_same_losses(plain, tmp_path, recompute):
    run_train(tmp_path, "recomputed", STEPS + [f"precision.recompute={recompute}"])
    assert metrics(tmp_path / "recomputed")[0] == pytest.approx(plain, abs=1e-6)
