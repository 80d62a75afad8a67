"""Sub-network evaluation: equal to evaluating one sub-network at a time, each shared prefix
computed once, in chunks sized from a memory budget, bounded in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ListStageNet, make_model, perturb_norms
from conftest import perturbed_resnet as resnet
from conftest import random_batch_lists as batch_lists
from oracle import evaluate_one_at_a_time
from torch import nn

import nestedtrain as nt
from nestedtrain import bn
from nestedtrain.analysis import (
    evaluate_space,
)
from nestedtrain.cli import main
from nestedtrain.elastic import space_subnets
from nestedtrain.engine.config import load_config
from nestedtrain.evaluation import (
    DEFAULT_MEMORY_MB,
    evaluate,
    evaluate_subnets,
    kl_drift_snapshot,
    subnet_logits,
    within_free_memory,
)
from nestedtrain.evaluation import passes as subnets_module

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(n_eval: int = 150, n_calib: int = 100, side: int = 8):
    """Fixed random data: eval batches of 32, calibration batches of 24."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n_eval, 1, side, side, generator=g)
    y = torch.randint(0, 10, (n_eval,), generator=g)
    c = torch.randn(n_calib, 1, side, side, generator=g)
    return (
        lambda: ((x[i : i + 32], y[i : i + 32]) for i in range(0, n_eval, 32)),
        lambda: (c[i : i + 24] for i in range(0, n_calib, 24)),
    )


@pytest.fixture
def passes(monkeypatch):
    """How many chunks the calibration and evaluation passes ran."""
    counts = {"calibrate": 0, "evaluate": 0}
    for name in counts:
        original = getattr(subnets_module._Runner, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(subnets_module._Runner, name, counted)
    return counts


def assert_same_but_loss_rounding(results: list[dict], expected: list[dict]) -> None:
    """The same predictions of every sub-network, and its loss to float rounding: a batch
    split to fit a budget sums the loss over other pieces."""
    assert [(r["subnet"], r["acc"], r["acc5"]) for r in results] == [
        (r["subnet"], r["acc"], r["acc5"]) for r in expected
    ]
    assert [r["loss"] for r in results] == pytest.approx([r["loss"] for r in expected], rel=1e-6)


# ------------------------------------------------------------------------ exactness
def test_a_tiny_budget_splits_eval_batches_with_identical_results(passes):
    model = resnet()
    eval_fn, calib_fn = batches()
    subnets = [*space_subnets(model, sample=6, seed=1), nt.Subnet.parse(model, "0.2.1-0.2-3")]
    naive = evaluate_one_at_a_time(model, subnets, eval_fn, calib_fn)
    before = bn.save_stats(model)
    tiny = evaluate_subnets(model, subnets, eval_fn, calib_fn, memory_mb=1e-3)
    # one image a chunk: the 150 eval images one by one; calibration batches stay whole
    # (train-mode BN normalises by the batch): 5 calibration batches
    assert passes == {"calibrate": 5, "evaluate": 150}
    assert_same_but_loss_rounding(tiny, naive)
    assert evaluate_subnets(model, subnets, eval_fn, calib_fn, memory_mb=None) == naive
    assert passes == {"calibrate": 6, "evaluate": 151}
    assert all(torch.equal(v, bn.save_stats(model)[k]) for k, v in before.items())


def test_chunk_images_wins_over_the_budget_and_takes_whole_batches(passes):
    model = resnet()
    eval_fn, calib_fn = batches()
    subnets = space_subnets(model, [1, 1, 1])
    naive = evaluate_one_at_a_time(model, subnets, eval_fn, calib_fn)
    shared = evaluate_subnets(model, subnets, eval_fn, calib_fn, 70, memory_mb=1e-3)
    assert shared == naive
    # at most 70 images a chunk: eval 32+32 | 32+32 | 22, calibration 24+24 | 24+24+4
    assert passes == {"calibrate": 2, "evaluate": 3}
    own = evaluate_subnets(model, subnets, eval_fn, None, memory_mb=1e-3)
    assert_same_but_loss_rounding(
        own, evaluate_subnets(model, subnets, eval_fn, None, memory_mb=None)
    )


def test_the_budget_sizes_chunks_from_the_activations(passes):
    model = resnet()
    eval_fn, calib_fn = batches(n_eval=256, n_calib=96)
    subnet = nt.Subnet.parse(model, "3-3-3")
    # One sub-network is a chain: while block b runs, its input and output are held. Every
    # resnet20 block at 8x8 keeps 16x8x8, 32x4x4 or 64x2x2 floats: 4 KiB an image at most.
    largest = 16 * 8 * 8 * 4
    per_image = 8 * 8 * 4 + 2 * largest  # the image, one block's input and output
    memory_mb = 64 * per_image / 2**20  # room for 64 images: two eval batches a chunk
    subnet_logits(model, [subnet], eval_fn, calib_fn, lambda *a: None, memory_mb=memory_mb)
    assert passes == {"calibrate": 2, "evaluate": 4}  # calibration: 2 x 24 of 96 a chunk


def test_bad_budgets_are_refused():
    model = resnet()
    eval_fn, calib_fn = batches()
    for bad in (0, -5.0, float("nan")):
        with pytest.raises(ValueError, match="memory_mb"):
            evaluate_subnets(model, ["1-1-1"], eval_fn, calib_fn, memory_mb=bad)


def test_the_recipe_field_is_checked():
    assert load_config(None, []).eval.memory_mb == DEFAULT_MEMORY_MB
    assert load_config(None, ["eval.memory_mb=256"]).eval.memory_mb == 256
    with pytest.raises(ValueError, match="eval.memory_mb=0.0 must be > 0"):
        load_config(None, ["eval.memory_mb=0"])


def _direct_kl(model: nn.Module, subnet: str, eval_fn, calib_fn) -> float:
    model.eval()
    with torch.no_grad():
        main_logp = torch.cat([F.log_softmax(model(x), 1) for x, _ in eval_fn()])
    saved = bn.save_stats(model)
    bn.recalibrate(model, calib_fn(), subnet)
    with nt.use_subnet(model, subnet), torch.no_grad():
        sub_logp = torch.cat([F.log_softmax(model(x), 1) for x, _ in eval_fn()])
    bn.load_stats(model, saved)
    return (main_logp.exp() * (main_logp - sub_logp)).sum(1).mean().item()


def test_kl_drift_in_chunks_equals_one_chunk_and_a_direct_computation(passes):
    model = resnet()
    eval_fn, calib_fn = batches()
    subnets = ["1-1-1", "3-3-3", "2-1-3", "1-1-1"]
    tiny = kl_drift_snapshot(model, subnets, eval_fn, calib_fn, memory_mb=1e-3)
    assert passes["evaluate"] == 150  # one image a chunk
    whole = kl_drift_snapshot(model, subnets, eval_fn, calib_fn, memory_mb=None)
    assert tiny == pytest.approx(whole, rel=1e-6)
    assert tiny["1-1-1"] == pytest.approx(_direct_kl(model, "1-1-1", eval_fn, calib_fn), rel=1e-5)


def test_one_at_a_time_fallback_streams_and_stays_exact():
    nt.declare_stages(ListStageNet, ["stage"], skippable=[[0, 1, 2]])
    torch.manual_seed(0)
    model = perturb_norms(ListStageNet())
    eval_fn, calib_fn = batches()
    subnets = ["1", "3", "0.2"]
    assert subnet_logits(model, subnets, eval_fn, calib_fn, lambda *a: None) == "naive"
    assert evaluate_subnets(model, subnets, eval_fn, calib_fn) == evaluate_one_at_a_time(
        model, [nt.Subnet.parse(model, s) for s in subnets], eval_fn, calib_fn
    )
    before = bn.save_stats(model)
    snapshot = kl_drift_snapshot(model, subnets, eval_fn, calib_fn)
    assert all(torch.equal(v, bn.save_stats(model)[k]) for k, v in before.items())
    for subnet in subnets:
        assert snapshot[subnet] == pytest.approx(
            _direct_kl(model, subnet, eval_fn, calib_fn), rel=1e-5
        )


# ------------------------------------------------------------- shared-prefix evaluation
def test_space_sizes_and_seeded_samples():
    model = resnet()
    assert len(space_subnets(model)) == 27
    assert [str(s) for s in space_subnets(model, [0, 1, 1])] == ["3-3-3", "3-3-2", "3-2-3", "3-2-2"]
    sample = space_subnets(model, sample=5, seed=1)
    assert len(set(sample)) == 5 and set(sample) <= set(space_subnets(model))
    assert sample == space_subnets(model, sample=5, seed=1)
    assert sample != space_subnets(model, sample=5, seed=2)
    assert len(space_subnets(model, sample=100)) == 27
    with pytest.raises(ValueError, match="sample=0"):
        space_subnets(model, sample=0)
    with pytest.raises(ValueError, match="max_drop"):
        space_subnets(model, "space3")  # a 4-stage space on a 3-stage model


def test_shared_evaluation_equals_naive_exactly_and_restores_the_model():
    model = resnet()
    model.train()
    before = bn.save_stats(model)
    eval_fn, calib_fn = batch_lists(8)
    subnets = space_subnets(model)
    naive = evaluate_one_at_a_time(model, subnets, eval_fn, calib_fn)
    shared = evaluate_subnets(model, subnets, eval_fn, calib_fn)
    assert shared == naive
    assert len({r["acc"] for r in shared}) > 5  # the sub-networks do differ
    assert model.training
    after = bn.save_stats(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.momentum == 0.1 for m in bn.batchnorms(model))


def test_each_prefix_is_computed_once():
    model = resnet()
    eval_fn, calib_fn = batch_lists(8)
    calls = []
    for stage in nt.find_stages(model):
        for block in stage.blocks:
            block.register_forward_hook(lambda *a: calls.append(1))
    subnet_logits(model, space_subnets(model), eval_fn, calib_fn, lambda *a: None)
    trie_blocks = 3 + 3 * 3 + 3 * 3 * 3  # stage-1 depths, then every stage-2, stage-3 prefix
    eval_batches, calib_batches = len(eval_fn()), len(calib_fn())
    probe = 2 * 9  # one full forward to find stem and head, one to check the split
    assert len(calls) == trie_blocks * (eval_batches + calib_batches) + probe


@pytest.mark.parametrize("family", ["timm-efficientnet_b0", "timm-mobilenetv3", "timm-vit_tiny"])
def test_shared_equals_naive_on_timm_families(family):
    model, side = make_model(family)
    eval_fn, calib_fn = batch_lists(side, chans=3, classes=7, n_eval=40, n_calib=30)
    subnets = space_subnets(model, sample=5, seed=3)
    assert evaluate_subnets(model, subnets, eval_fn, calib_fn) == evaluate_one_at_a_time(
        model, subnets, eval_fn, calib_fn
    )


def test_shared_handles_any_subnet_order_duplicates_chunks_and_own_statistics():
    model = resnet()
    eval_fn, calib_fn = batch_lists(8)
    subnets = [
        nt.Subnet.parse(model, text)
        for text in ["0.2.1-0.2-3", "1-1-1", "3-3-3", "1-1-1", "2.-2-0.1."]
    ]
    naive = evaluate_one_at_a_time(model, subnets, eval_fn, calib_fn)
    assert evaluate_subnets(model, subnets, eval_fn, calib_fn, chunk_images=64) == naive
    own = evaluate_subnets(model, subnets, eval_fn, None)
    for subnet, result in zip(subnets, own):
        with nt.use_subnet(model, subnet):
            assert result == {"subnet": str(subnet), **evaluate(model, eval_fn())}


def test_model_that_cannot_be_split_falls_back_to_one_at_a_time():
    nt.declare_stages(ListStageNet, ["stage"], skippable=[[0, 1, 2]])
    torch.manual_seed(0)
    model = perturb_norms(ListStageNet())
    eval_fn, calib_fn = batch_lists(8)
    subnets = nt.OrderedSampler(model).all()
    assert subnet_logits(model, subnets, eval_fn, calib_fn, lambda *a: None) == "naive"
    assert evaluate_subnets(model, subnets, eval_fn, calib_fn) == evaluate_one_at_a_time(
        model, subnets, eval_fn, calib_fn
    )


def test_evaluate_subnets_restores_main_bn_and_mode(digits):
    from oracle import evaluate_one_at_a_time

    from nestedtrain.elastic import subnets_from_spec

    model = nt.create_model("resnet20", num_classes=10, in_chans=1)
    model.train()(next(iter(digits.calibration_batches())))  # give BN non-default statistics
    before = nt.bn.save_stats(model)
    subnets = subnets_from_spec(model, "sample:3")
    results = evaluate_one_at_a_time(
        model, subnets, lambda: digits.eval_batches("test"), digits.calibration_batches
    )
    assert [r["subnet"] for r in results] == [str(s) for s in subnets] and len(results) == 3
    after = nt.bn.save_stats(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training
    # each sub-network's accuracy is the one of its export with freshly calibrated BN
    exported = nt.export_subnet(model, subnets[-1])
    nt.bn.recalibrate(exported, digits.calibration_batches())
    from nestedtrain.evaluation import evaluate

    assert evaluate(exported, digits.eval_batches("test"))["acc"] == results[-1]["acc"]


def test_evaluate_space_passes_the_budget_on(passes):
    model = resnet()
    eval_fn, calib_fn = batches()
    tiny = evaluate_space(model, eval_fn, calib_fn, space=[1, 0, 1], memory_mb=1e-3)
    # the budget reached the evaluator: one eval image a chunk, whole calibration batches
    assert passes == {"calibrate": 5, "evaluate": 150}
    whole = evaluate_space(model, eval_fn, calib_fn, space=[1, 0, 1], memory_mb=None)
    assert passes == {"calibrate": 6, "evaluate": 151}  # and no budget: one chunk
    assert_same_but_loss_rounding(tiny.pop("subnets"), whole.pop("subnets"))
    assert tiny == whole


# --------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("memory") / "run"
    recipe = out.parent / "tiny.yaml"
    recipe.write_text("method: ct\nmodel:\n  name: resnet20\ndata:\n  name: digits\n")
    tiny = ["data.train_subset=128", "batch_size=64", "epochs=1", "eval.subnets=none"]
    assert main(["train", str(recipe), *tiny, "--out", str(out)]) == 0
    return out


def test_eval_memory_budget_changes_nothing_but_memory(run_dir, tmp_path, capsys):
    reports = []
    for budget in ([], ["--memory-mb", "0.01"]):
        out = tmp_path / f"eval{len(reports)}.json"
        args = ["eval", str(run_dir), "--subnets", "sample:5", "--batch-size", "64"]
        assert main([*args, *budget, "--json", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["subnets"] == reports[1]["subnets"]
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--memory-mb", "0"]) == 2
    assert "'0' is no memory budget" in capsys.readouterr().err


def test_analyze_takes_a_memory_budget(run_dir, tmp_path, capsys):
    out = tmp_path / "subnets"
    args = ["analyze", "subnets", str(run_dir), "--space", "1", "--memory-mb", "0.05"]
    assert main([*args, "--calib-images", "64", "--out", str(out)]) == 0
    payload = json.loads((out / "subnets.json").read_text())
    assert "--memory-mb 0.05" in payload["command"]
    capsys.readouterr()
    assert main(["analyze", "subnets", str(run_dir), "--memory-mb", "none"]) == 2
    assert "'none' is no memory budget" in capsys.readouterr().err


# ------------------------------------------------------------------------- measured
# A child process per size, so that each peak RSS is its own: timm resnet50 at 96x96 (two
# sub-networks, 64 calibration images, batches of 32) evaluated on 64 or 384 random images.
_CHILD = """
import json, resource, sys
import timm, torch
from nestedtrain.evaluation import evaluate_subnets

torch.set_num_threads(1)
n_eval, memory_mb = int(sys.argv[1]), float(sys.argv[2])
torch.manual_seed(0)
model = timm.create_model("resnet50", num_classes=10)
g = torch.Generator().manual_seed(0)
images = torch.randn(n_eval, 3, 96, 96, generator=g)
labels = torch.randint(0, 10, (n_eval,), generator=g)
calib = torch.randn(64, 3, 96, 96, generator=g)
eval_batches = lambda: ((images[i : i + 32], labels[i : i + 32]) for i in range(0, n_eval, 32))
calib_batches = lambda: (calib[i : i + 32] for i in range(0, 64, 32))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
evaluate_subnets(
    model, ["3-4-6-3", "1-2-3-1"], eval_batches, calib_batches, memory_mb=memory_mb
)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))
"""


def _peak_growth_mb(sizes: list[int], memory_mb: float) -> list[float]:
    """How far evaluation raised each child's peak RSS (ru_maxrss is in KiB on Linux)."""
    # glibc's default keeps freed blocks of up to 32 MiB cached, so peak RSS would wander by
    # ±100 MiB from run to run; a fixed mmap threshold hands every freed activation back to
    # the OS, and the peak RSS is then what the code holds (to 0.1 MiB between runs).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(n_eval), str(memory_mb)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n_eval in sizes
    ]
    growth = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        growth.append(json.loads(out.strip().splitlines()[-1]))
    return growth


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB: Linux")
def test_peak_memory_does_not_grow_with_the_eval_set():
    # 64 MiB holds about 50 images' activations here (≈1.2 MiB an image: the image and the
    # block outputs the trie holds at once), so every chunk is one batch of 32 for both
    # sizes, and six times the images may add no more than one batch: 40 MiB, about what a
    # batch of 32 holds. Measured (peak RSS growth, 64 -> 384 images): 103 -> 103 MiB with
    # this budget; 139 -> 499 MiB with memory_mb=None (one chunk of everything); 300 -> 1,538
    # MiB for the code before budgets (one chunk, and it also kept every ancestor's
    # activations alive while a subtree ran).
    small, large = _peak_growth_mb([64, 384], memory_mb=64)
    assert large - small < 40, (small, large)


def test_a_cuda_budget_is_at_most_half_the_free_device_memory(monkeypatch):
    # CUDA-only; the device's free memory stands in for torch.cuda.mem_get_info here.
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 80 * gib))
    cuda = torch.device("cuda", 0)
    assert within_free_memory(4 * gib, cuda) == gib
    assert within_free_memory(DEFAULT_MEMORY_MB * 2**20, cuda) == DEFAULT_MEMORY_MB * 2**20
    assert within_free_memory(None, cuda) is None  # no limit, asked for
    assert within_free_memory(4 * gib, torch.device("cpu")) == 4 * gib
