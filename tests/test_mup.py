"""muP: coordinate check and parameter groups (the forward pass against Granite: test_convert)."""

import csv
import subprocess

import pytest

from helpers import ROOT, command, megatron_power
from megatron_power.config import load_config
from megatron_power.science.coordcheck import slopes

STEPS = 7
# lr 0.02: the lr these bounds were set at (the check runs at a constant lr_max).
COORD = ["model.num_layers=2", "model.seq_length=128", "train.global_batch_size=8",
         "train.micro_batch_size=8", "schedule.lr_max=0.02"]


@pytest.mark.slow
def test_coordinate_check_is_flat_under_mup_and_not_under_sp(default_data, tmp_path):
    subprocess.run(command("coordcheck", "proxy", "--widths", "128,256,512,1024",
                    "--steps", str(STEPS), "--out", str(tmp_path), *COORD, f"out_dir={tmp_path}"),
                   cwd=ROOT, check=True, capture_output=True)
    rows = [dict(r, width=int(r["width"]), step=int(r["step"]), rms=float(r["rms"]))
            for r in csv.DictReader(open(tmp_path / "coordcheck.csv"))]
    assert (tmp_path / "coordcheck.png").read_bytes()[:4] == b"\x89PNG"
    last = slopes(rows, STEPS - 1)
    quantities = {q for _, q in last}
    assert quantities == {"embedding", "attn.0", "attn.1", "mlp.0", "mlp.1", "logits"}
    for q in quantities:
        # muP: every activation and the logits keep their scale across an 8x range of widths.
        # One initialisation seed: slopes move by about 0.1 between seeds (seen up to 0.14).
        assert abs(last["muP", q]) <= 0.2, (q, last["muP", q])
    for q in ("attn.0", "attn.1", "mlp.0", "mlp.1"):
        assert last["SP", q] > 0.5, (q, last["SP", q])  # standard parametrization: they grow
    # SP logits grow with width (about sqrt(width)) once updates start; with the final RMSNorm
    # and this lr they saturate a few steps later, which is why step 1 is the one asserted.
    assert slopes(rows, 1)["SP", "logits"] > 0.3


@pytest.mark.slow
def test_coordinate_check_is_flat_across_depth_with_completep_and_not_without(default_data, tmp_path):
    """Depths 2 to 16 at width 128, a constant lr 0.02: with CompleteP (alpha 1 on a base of 2
    layers) the first and last blocks' outputs, the residual stream and the logits keep their
    scale; without depth rules the blocks' outputs shrink with depth at initialisation (the output
    projections' 1/sqrt(2 x layers)) and the residual stream grows with depth after two updates."""
    subprocess.run(command("coordcheck", "proxy", "--depths", "2,4,8,16", "--steps", "3", "--out", str(tmp_path),
                           *COORD, "model.hidden_size=128", "model.ffn_hidden_size=384", f"out_dir={tmp_path}"),
                   cwd=ROOT, check=True, capture_output=True)
    rows = [dict(r, depth=int(r["depth"]), step=int(r["step"]), rms=float(r["rms"]))
            for r in csv.DictReader(open(tmp_path / "coordcheck.csv"))]
    at_init, after = slopes(rows, 0), slopes(rows, 2)
    quantities = {"embedding", "attn.first", "mlp.first", "attn.last", "mlp.last", "residual", "logits"}
    assert {q for _, q in after} == quantities
    for q in quantities:
        assert abs(after["alpha=1", q]) <= 0.2, (q, after["alpha=1", q])  # seen up to 0.13
    for q in ("attn.first", "mlp.first", "attn.last", "mlp.last"):
        assert at_init["alpha=0", q] < -0.4, (q, at_init["alpha=0", q])  # seen -0.5
    assert after["alpha=0", "residual"] > 0.3, after["alpha=0", "residual"]  # seen 0.5


def _params(*overrides, nproc=1, with_std=False):
    out = megatron_power("params", "proxy", *overrides, nproc=nproc).stdout.splitlines()[2:]
    rows = [line.split() for line in out]
    return {cols[0]: (float(cols[2]), float(cols[3])) + ((float(cols[5]),) if with_std else ()) for cols in rows}


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_groups_follow_the_mup_rules(default_data, tied):
    lr, wd, m_width = 0.02, 0.1, 4.0
    groups = _params("model.num_layers=2", "mup.base_width=64", f"model.tie_embeddings={tied}",
                     f"schedule.lr_max={lr}", f"optim.weight_decay={wd}")
    expected = {
        "embedding.word_embeddings.weight": (lr, wd),
        "decoder.final_layernorm.weight": (lr, 0.0),
    }
    if not tied:
        expected["output_layer.weight"] = (lr, wd)
    for i in range(2):
        layer = f"decoder.layers.{i}."
        expected[layer + "input_layernorm.weight"] = (lr, 0.0)
        expected[layer + "pre_mlp_layernorm.weight"] = (lr, 0.0)
        for matrix in ("self_attention.linear_qkv", "self_attention.linear_proj",
                       "mlp.linear_fc1", "mlp.linear_fc2"):
            expected[layer + matrix + ".weight"] = (lr / m_width, wd)
    assert groups.keys() == expected.keys()  # every parameter, each in exactly one group
    for name, (group_lr, group_wd) in expected.items():
        assert groups[name] == pytest.approx((group_lr, group_wd)), name


def test_parameter_groups_follow_the_depth_rules(default_data):
    """Dey et al. 2025, Table 1, at alpha = 0.5 (depth-muP, where every depth factor differs from
    1) and m_depth = 4 layers / base 2: hidden matrices at lr / m_width x m_depth^(alpha - 1) with
    Adam epsilon x m_depth^-alpha, block norms at lr x m_depth^(alpha - 1), embeddings and the final
    norm at lr; init without a depth factor (output projections at the base depth's std); each
    block's output x residual_mult x m_depth^-alpha."""
    lr, eps, m_width, m_depth, alpha, std = 0.02, 1e-8, 4.0, 2.0, 0.5, 0.1
    lines = megatron_power("params", "proxy", "model.num_layers=4", "mup.base_width=64", f"schedule.lr_max={lr}",
                           f"optim.eps={eps}", f"mup.depth_alpha={alpha}", "mup.base_depth=2",
                           f"model.init_std={std}").stdout.splitlines()
    assert f"m_width 4, m_depth 2 (depth_alpha 0.5); embedding x 12, each block's output x {0.22 * 2 ** -0.5:.6g}" in lines[0]
    rows = {cols[0]: [float(c) for c in cols[2:]] for cols in map(str.split, lines[2:])}  # printed to 4 digits
    depth_lr = m_depth ** (alpha - 1)
    hidden_std = std / m_width ** 0.5
    assert rows["embedding.word_embeddings.weight"][0] == lr and rows["decoder.final_layernorm.weight"][0] == lr
    for i in range(4):
        layer = f"decoder.layers.{i}."
        for norm in ("input_layernorm.weight", "pre_mlp_layernorm.weight"):
            assert rows[layer + norm][:3] == pytest.approx([lr * depth_lr, 0.0, eps], rel=1e-3), layer + norm
        for matrix in ("self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"):
            assert rows[layer + matrix][:3] == pytest.approx([lr / m_width * depth_lr, 0.1, eps * m_depth ** -alpha], rel=1e-3)
            assert rows[layer + matrix][3] == pytest.approx(hidden_std, rel=0.05)
        for matrix in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
            assert rows[layer + matrix][3] == pytest.approx(hidden_std / (2 * 2) ** 0.5, rel=0.05), layer + matrix


def test_standard_parametrization_has_one_learning_rate(default_data):
    groups = _params("model.num_layers=1", "mup.enabled=false")
    assert {lr for lr, _ in groups.values()} == {load_config("proxy").schedule.lr_max}


MOE = ["model.num_layers=2", "mup.base_width=64", "model.num_experts=4", "model.moe_topk=2",
       "model.moe_ffn_hidden_size=128", "schedule.lr_max=0.02", "optim.weight_decay=0.1", "model.init_std=0.1"]


@pytest.mark.slow
def test_moe_router_and_experts_follow_the_mup_rules_under_expert_parallelism(default_data):
    """Router and experts are hidden matrices: lr / m_width, init std 0.1 / sqrt(m_width) (and the
    experts' output projections / sqrt(2 x layers)); the same under EP = 2 (on its first rank,
    which holds experts 0 and 1 as its local 0 and 1) as under EP = 1."""
    lr, wd, m_width, layers = 0.02, 0.1, 4.0, 2
    single = _params(*MOE, with_std=True)
    parallel = _params(*MOE, "parallel.ep=2", nproc=2, with_std=True)
    hidden_std = 0.1 / m_width ** 0.5
    for i in range(layers):
        layer = f"decoder.layers.{i}.mlp."
        expected = {layer + "router.weight": hidden_std}
        for e in range(4):
            expected[layer + f"experts.local_experts.{e}.linear_fc1.weight"] = hidden_std
            expected[layer + f"experts.local_experts.{e}.linear_fc2.weight"] = hidden_std / (2 * layers) ** 0.5
        for name, std in expected.items():
            assert single[name][:2] == pytest.approx((lr / m_width, wd)), name
            # Sample std of at least 128 x 128 draws: within 5%.
            assert single[name][2] == pytest.approx(std, rel=0.05), name
            if ".local_experts.2." in name or ".local_experts.3." in name:
                assert name not in parallel, name  # on the second rank
            else:
                assert parallel[name][:2] == single[name][:2], name
                assert parallel[name][2] == pytest.approx(std, rel=0.05), name
    assert set(parallel) < set(single)
