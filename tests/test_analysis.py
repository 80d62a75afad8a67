"""Loafing analyses: shared-prefix evaluation, destruction, loafing matrix, KL drift, logits,
ERF, plots, the report, and their CLI."""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import UserResNet, declare_user_resnet, make_model, perturb_norms
from conftest import perturbed_resnet as resnet
from conftest import random_batch_lists as batches
from omegaconf import OmegaConf
from oracle import evaluate_one_at_a_time
from torch import nn

import nestedtrain as nt
from nestedtrain import bn
from nestedtrain.analysis import (
    destroyed_subnets,
    destruct,
    effective_receptive_field,
    erf_area_ratios,
    evaluate_space,
    loafing_matrix,
    logit_norms,
    match_subnet,
    swap_subnet,
    write_report,
)
from nestedtrain.atomic import atomic_save
from nestedtrain.cli import main
from nestedtrain.elastic.weightmap import inherit
from nestedtrain.engine.checkpoint import CHECKPOINT_FORMAT
from nestedtrain.engine.config import load_config
from nestedtrain.engine.trainer import train
from nestedtrain.evaluation import evaluate, kl_drift_snapshot
from nestedtrain.records import append_kl_drift, read_kl_drift

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["data.train_subset=256", "batch_size=64", "epochs=2", "device=cpu", "data.calib_images=256"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- helpers
def save_checkpoint(model: nn.Module, path: Path, overrides: list[str]) -> Path:
    """A checkpoint in the trainer's layout, of an untrained (perturbed) model."""
    cfg = load_config(None, [*TINY, *overrides])
    atomic_save(
        {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "num_classes": 10,
            "in_chans": 1,
            "epoch": 0,
        },
        path,
    )
    return path


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, path
    image = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real two-epoch ST run of resnet20 on digits, with KL drift recorded."""
    out = tmp_path_factory.mktemp("analysis") / "run"
    cfg = load_config(
        None,
        [
            *TINY,
            "method=st",
            "eval.subnets=sample:3",
            "analysis.kl_drift_every=1",
            "analysis.kl_drift_subnets=sample:4",
        ],
    )
    train(cfg, out, progress=False)
    return out


def test_evaluate_space_stats_and_individual_models():
    main_model, small = resnet("resnet32"), resnet("resnet20", seed=1)
    eval_fn, calib_fn = batches(8)
    result = evaluate_space(
        main_model, eval_fn, calib_fn, space=[1, 1, 1], individual=[("r20", small)]
    )
    assert result["space_size"] == 8 and result["stats"]["count"] == 8
    accs = [r["acc"] for r in result["subnets"] if r["in_space"]]
    assert result["stats"]["max"] == max(accs) and result["stats"]["min"] == min(accs)
    assert result["stats"]["mean"] == pytest.approx(np.mean(accs))
    assert result["stats"]["std"] == pytest.approx(np.std(accs))
    (ind,) = result["individual"]
    assert ind["subnet"] == "3-3-3" and ind["acc"] == evaluate(small, eval_fn())["acc"]
    # 3-3-3 is outside the space (5-5-5 drops at most one block per stage) but evaluated
    row = next(r for r in result["subnets"] if r["subnet"] == "3-3-3")
    assert not row["in_space"]
    assert (
        ind["acc_inside"]
        == evaluate_one_at_a_time(main_model, ["3-3-3"], eval_fn, calib_fn)[0]["acc"]
    )


def test_match_subnet_accepts_sub_architectures_only():
    assert str(match_subnet(resnet("resnet56"), resnet("resnet32"))) == "5-5-5"
    with pytest.raises(ValueError, match="deeper"):
        match_subnet(resnet("resnet20"), resnet("resnet32"))
    with pytest.raises(ValueError, match="same family"):
        match_subnet(resnet("resnet56"), nt.create_model("resnet18", num_classes=10))
    with pytest.raises(ValueError, match="shapes"):
        match_subnet(resnet("resnet56"), resnet("resnet20", widths=(8, 16, 32)))
    timm34 = nt.create_model("resnet34", num_classes=10)
    assert str(match_subnet(timm34, nt.create_model("resnet18", num_classes=10))) == "2-2-2-2"


# ------------------------------------------------------------------------ destruction
def cycles(order: tuple[int, ...], positions: list[int]) -> int:
    image = {p: order[i] for i, p in enumerate(positions)}
    seen, count = set(), 0
    for p in positions:
        if p not in seen:
            count += 1
            while p not in seen:
                seen.add(p)
                p = image[p]
    return count


def test_deletion_and_permutation_counts_on_resnet20():
    model = resnet()
    # stage 1 keeps one of its 3 blocks; stages 2 and 3 may lose blocks 1 and 2
    assert [destroyed_subnets(model, "delete", k)[1] for k in range(7)] == [1, 7, 21, 34, 31, 15, 3]
    # stage 1: blocks 0-2 all movable; stages 2, 3: blocks 1-2 (block 0 down-samples)
    assert [destroyed_subnets(model, "permute", k)[1] for k in range(5)] == [1, 5, 9, 7, 2]
    for subnet in destroyed_subnets(model, "permute", 2)[0]:
        blocks = subnet.blocks
        assert blocks[1][0] == 0 and blocks[2][0] == 0  # down-sampling blocks stay first
        distance = (3 - cycles(blocks[0], [0, 1, 2])) + sum(
            2 - cycles(blocks[s][1:], [1, 2]) for s in (1, 2)
        )
        assert distance == 2
    sample, total = destroyed_subnets(model, "delete", 3, max_combinations=5, seed=4)
    assert total == 34 and len(set(sample)) == 5
    assert sample == destroyed_subnets(model, "delete", 3, max_combinations=5, seed=4)[0]
    assert all(s.num_blocks == 6 for s in sample)


class FiveStageNet(nn.Module):
    """The layout of the appendix's Table r1: stages of 2, 3, 4, 2 and 3 blocks, each led by a
    block that cannot be skipped."""

    def __init__(self):
        super().__init__()
        for s, n in enumerate((2, 3, 4, 2, 3)):
            self.add_module(f"s{s}", nn.Sequential(*(nn.Identity() for _ in range(n))))

    def forward(self, x):
        return x


def test_permutation_counts_match_the_appendix_table_r2():
    nt.declare_stages(
        FiveStageNet, [f"s{s}" for s in range(5)], skippable=[range(1, n) for n in (2, 3, 4, 2, 3)]
    )
    counts = [destroyed_subnets(FiveStageNet(), "permute", k)[1] for k in range(1, 5)]
    assert counts == [5, 9, 7, 2]
    with pytest.raises(ValueError, match="k=5"):
        destroyed_subnets(FiveStageNet(), "permute", 5)


def test_deleting_zero_blocks_drops_nothing():
    model = resnet()
    eval_fn, calib_fn = batches(8)
    for policy, calib in (("recalibrate", calib_fn), ("own", None)):
        result = destruct(model, eval_fn, calib, delete_k=[0, 1], permute_k=[], bn=policy)
        (zero, one) = result["delete"]
        assert zero["total"] == 1 and zero["results"][0]["drop"] == 0.0
        assert one["total"] == 7 and len(result["delete_one"]) == 7
        assert any(r["drop"] != 0 for r in one["results"])
    own = destruct(model, eval_fn, None, delete_k=[0], permute_k=[], bn="own")
    assert own["intact"]["acc"] == evaluate(model, eval_fn())["acc"]


def test_swapping_a_block_with_itself_is_rejected():
    model = resnet()
    assert str(swap_subnet(model, 1, 0, 2)) == "2.1.0-3-3"
    with pytest.raises(ValueError, match="itself"):
        swap_subnet(model, 1, 2, 2)
    with pytest.raises(ValueError, match="cannot swap"):
        swap_subnet(model, 2, 0, 1)  # the down-sampling block cannot move


def test_bad_destruction_requests_are_value_errors():
    model = nt.models.CifarResNet((3, 1, 3), num_classes=10, in_chans=1)
    eval_fn, calib_fn = batches(8)
    with pytest.raises(ValueError, match="one block"):
        swap_subnet(model, 2, 0, 1)
    with pytest.raises(ValueError, match="nothing to permute"):
        destroyed_subnets(model, "permute", 1, stages=[2])
    with pytest.raises(ValueError, match="k=6"):
        destroyed_subnets(model, "delete", 6)  # 2 + 0 + 2 deletable (stage 1 keeps one of its 3)
    with pytest.raises(ValueError, match="stage 4"):
        destroyed_subnets(model, "delete", 1, stages=[4])
    with pytest.raises(ValueError, match="kind='swap': use one of delete, permute"):
        destroyed_subnets(model, "swap", 1)
    with pytest.raises(ValueError, match="bn="):
        destruct(model, eval_fn, calib_fn, bn="running")
    single_blocks = nt.models.CifarResNet(1, num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match="nothing can be deleted"):
        destruct(single_blocks, eval_fn, calib_fn)


# --------------------------------------------------------------------- loafing matrix
def test_loafing_matrix_diagonal_and_cells():
    r20, r32 = resnet("resnet20", seed=1), resnet("resnet32", seed=2)
    eval_fn, calib_fn = batches(8)
    result = loafing_matrix([r20, r32], ["r20", "r32"], eval_fn, calib_fn, ["resnet20", "resnet32"])
    assert result["architectures"] == ["resnet20", "resnet32"]
    assert result["acc"][0][0] == evaluate(r20, eval_fn())["acc"]
    assert result["acc"][1][1] == evaluate(r32, eval_fn())["acc"]
    assert result["acc"][0][1] is None and result["how"][0][1] is None
    assert result["how"][1][0] == "subnet 3-3-3"
    assert (
        result["acc"][1][0] == evaluate_one_at_a_time(r32, ["3-3-3"], eval_fn, calib_fn)[0]["acc"]
    )
    with pytest.raises(ValueError, match="one family"):
        loafing_matrix(
            [r20, nt.create_model("resnet18", num_classes=10, in_chans=1)],
            ["a", "b"],
            eval_fn,
            calib_fn,
        )


def tiny_densenet(layers: tuple[int, ...], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nt.create_model(
        "densenet121", num_classes=10, in_chans=1, growth_rate=4, block_config=layers
    )
    return perturb_norms(model, seed)


def test_loafing_matrix_of_densenets_inherits_weights():
    small, large = tiny_densenet((1, 1, 1, 1), 1), tiny_densenet((2, 2, 1, 2), 2)
    eval_fn, calib_fn = batches(32, n_eval=40, n_calib=30)
    result = loafing_matrix([small, large], ["small", "large"], eval_fn, calib_fn)
    assert result["family"] == "densenet"
    assert result["acc"][0][0] == evaluate(small, eval_fn())["acc"]
    assert result["acc"][0][1] is None and result["how"][1][0] == "inherited"
    reference = tiny_densenet((1, 1, 1, 1), 3)
    inherit(large, reference)
    bn.recalibrate(reference, calib_fn())
    assert result["acc"][1][0] == evaluate(reference, eval_fn())["acc"]


def test_loafing_matrix_of_declared_models_runs_ordered_subnets():
    declare_user_resnet()
    torch.manual_seed(0)
    small = perturb_norms(UserResNet((2, 2), in_chans=1), 1)
    large = perturb_norms(UserResNet((3, 4), in_chans=1), 2)
    eval_fn, calib_fn = batches(8)
    result = loafing_matrix([small, large], ["small", "large"], eval_fn, calib_fn)
    assert result["depths"] == {"small": [2, 2], "large": [3, 4]}
    assert result["acc"][0][1] is None and result["how"][1][0] == "subnet 2-2"
    inside = evaluate_one_at_a_time(large, ["2-2"], eval_fn, calib_fn)[0]["acc"]
    assert result["acc"][1][0] == inside
    with pytest.raises(ValueError, match="declare_stages"):
        loafing_matrix([nn.Sequential(nn.Flatten(), nn.Linear(64, 10))], ["x"], eval_fn, calib_fn)


# -------------------------------------------------------------------------- KL drift
def test_kl_drift_snapshot_matches_a_direct_computation():
    model = resnet()
    eval_fn, calib_fn = batches(8)
    before = bn.save_stats(model)
    snapshot = kl_drift_snapshot(model, ["1-1-1", "3-3-3"], eval_fn, calib_fn)
    assert list(snapshot) == ["1-1-1", "3-3-3"]
    assert all(torch.equal(before[k], v) for k, v in bn.save_stats(model).items())
    model.eval()
    main_logp = torch.cat([F.log_softmax(model(x), 1) for x, _ in eval_fn()])
    bn.recalibrate(model, calib_fn(), "1-1-1")
    with nt.use_subnet(model, "1-1-1"), torch.no_grad():
        sub_logp = torch.cat([F.log_softmax(model(x), 1) for x, _ in eval_fn()])
    expected = (main_logp.exp() * (main_logp - sub_logp)).sum(1).mean().item()
    assert snapshot["1-1-1"] == pytest.approx(expected, rel=1e-5)
    assert snapshot["3-3-3"] >= 0


def test_kl_drift_records_round_trip(tmp_path):
    append_kl_drift(tmp_path, 0, {"1-1-1": 0.5, "3-3-3": 0.1})
    append_kl_drift(tmp_path, 1, {"1-1-1": 0.4, "3-3-3": 0.05})
    records = read_kl_drift(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["kl"] == [{"subnet": "1-1-1", "kl": 0.4}, {"subnet": "3-3-3", "kl": 0.05}]
    with pytest.raises(ValueError, match="kl_drift_every"):
        read_kl_drift(tmp_path / "nothing")


# ------------------------------------------------------------------------ logits, ERF
def test_logit_norms_is_the_mean_l2_norm():
    model = resnet()
    eval_fn, _ = batches(8)
    result = logit_norms(model, eval_fn())
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in eval_fn()])
    assert result["images"] == 150
    assert result["mean_norm"] == pytest.approx(logits.norm(dim=1).mean().item(), rel=1e-6)
    assert result["acc"] == evaluate(model, eval_fn())["acc"]


def test_erf_stays_inside_the_receptive_field():
    model = resnet()
    eval_fn, calib_fn = batches(8)
    erf = effective_receptive_field(
        model, eval_fn(), input_size=64, num_images=16, subnet="1-1-1", calib_batches=calib_fn
    )
    assert erf.shape == (64, 64) and (erf >= 0).all()
    # 1-1-1 sees at most 25 pixels across (stem, one block per stage): none further away
    assert erf[:, :16].sum() == 0 and erf[:16, :].sum() == 0
    assert erf[28:36, 28:36].sum() > 0
    ratios = erf_area_ratios(erf)
    assert list(ratios.values()) == sorted(ratios.values()) and ratios["0.99"] < 0.25
    vit, side = make_model("timm-vit_tiny")
    with pytest.raises(ValueError, match="feature map"):
        effective_receptive_field(vit, [torch.randn(2, 3, side, side)])


# ---------------------------------------------------------------------- CLI and report
def analyze(*args: str) -> int:
    return main(["analyze", *map(str, args)])


def test_cli_analyses_write_json_png_and_their_command(run, tmp_path, capsys):
    r32 = save_checkpoint(resnet("resnet32"), tmp_path / "r32.pt", ["model.name=resnet32"])
    assert analyze("subnets", run, "--sample", 6, "--calib-images", 128) == 0
    last = run / "checkpoints" / "last.pt"
    assert (
        analyze("subnets", r32, "--space", 2, "--individual", last, "--out", tmp_path / "sub") == 0
    )
    assert analyze("destruct", run, "--k", "0,1,2", "--permute-k", "1", "--swap", "1:0:1") == 0
    assert analyze("matrix", run, r32, "--out", tmp_path / "matrix") == 0
    assert analyze("kl-drift", run) == 0
    assert analyze("logits", run, r32) == 0
    assert analyze("erf", run, "--input-size", 16, "--images", 8) == 0
    printed = capsys.readouterr().out
    assert "sub-network" in printed and "wrote" in printed
    outputs = {
        run / "analysis/subnets/subnets": 6,
        tmp_path / "sub/subnets": 27,
        run / "analysis/destruct/destruct": None,
        tmp_path / "matrix/matrix": None,
        run / "analysis/kl-drift/kl_drift": None,
        run / "analysis/logits/logits": None,
        run / "analysis/erf/erf-16": None,
    }
    for stem, count in outputs.items():
        data = json.loads(stem.with_suffix(".json").read_text())
        assert data["command"].startswith(f"nestedtrain analyze {data['analysis']} ")
        assert_png(stem.with_suffix(".png"))
        if count is not None:
            assert len(data["subnets"]) == count and data["stats"]["count"] == count
    individual = json.loads((tmp_path / "sub/subnets.json").read_text())["individual"]
    assert individual[0]["subnet"] == "3-3-3"
    matrix = json.loads((tmp_path / "matrix/matrix.json").read_text())
    assert matrix["acc"][0][1] is None and matrix["how"][1][0] == "subnet 3-3-3"
    destruct_json = json.loads((run / "analysis/destruct/destruct.json").read_text())
    assert destruct_json["delete"][0]["results"][0]["drop"] == 0.0
    assert [g["total"] for g in destruct_json["delete"]] == [1, 7, 21]


def test_cli_bad_input_exits_2(run, tmp_path, capsys):
    r44 = save_checkpoint(resnet("resnet44"), tmp_path / "r44.pt", ["model.name=resnet44"])
    assert analyze("destruct", run, "--k", "9") == 2
    assert analyze("destruct", run, "--k", "1", "--swap", "1:2:2") == 2
    assert analyze("destruct", run, "--k", "1", "--permute-k", "1", "--stages", "4") == 2
    assert analyze("subnets", run, "--individual", r44) == 2
    assert analyze("subnets", run, "--space", "space3") == 2
    assert analyze("subnets", run, "--sample", "0") == 2
    assert analyze("kl-drift", tmp_path) == 2
    assert analyze("erf", run, "--subnet", "4-4-4") == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 8 and all(e.startswith("nestedtrain: error: ") for e in errors)
    assert "itself" in errors[1] and "deeper" in errors[3]


def test_report_embeds_every_plot(run, capsys):
    assert analyze("subnets", run, "--sample", 4) == 0
    assert analyze("destruct", run, "--k", "1", "--permute-k", "") == 0
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    markdown = (run / "report.md").read_text()
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    pngs = sorted((run / "analysis").glob("*/*.png"))
    # + training curves, + the KL drift during training unless `analyze kl-drift` drew it
    assert len(uris) == len(pngs) + 1 + (not (run / "analysis" / "kl-drift").is_dir())
    for uri in uris:
        data = base64.b64decode(uri)
        assert data[:8] == PNG_MAGIC
        assert matplotlib.image.imread(io.BytesIO(data), format="png").shape[0] > 50
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert_png(run / link)
    for path in (run / "analysis").glob("*/*.json"):
        command = json.loads(path.read_text())["command"]
        assert command in markdown
        assert command.replace("'", "&#x27;").replace('"', "&quot;") in html
    assert "main_acc" in markdown and "Configuration" in markdown
    with pytest.raises(ValueError, match="does not exist"):
        write_report(run / "missing")


def test_all_cli_subcommands_are_registered():
    import argparse

    from nestedtrain.cli.analyze import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for words in itertools.product(["analyze"], ["subnets", "destruct", "erf"]):
        args = parser.parse_args([*words, "ckpt"])
        assert callable(args.handler)
    assert callable(parser.parse_args(["report", "run"]).handler)
