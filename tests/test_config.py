"""Bad recipes and overrides are refused with one clear line each, before any work starts."""

import subprocess

import pytest

from conftest import BIN, ROOT

from megatron_power.config import ConfigError, load_config, parse_count

BAD = [
    # (overrides, world size, what the message must say)
    (["model.num_attention_heads=6"], 1, "model.hidden_size (256) must be divisible by model.num_attention_heads (6)"),
    (["parallel.tp=8"], 8, "model.num_attention_heads (4) must be divisible by parallel.tp (8)"),
    (["parallel.pp=3"], 3, "model.num_layers (4) must be divisible by parallel.pp (3)"),
    (["train.global_batch_size=30"], 1, "train.global_batch_size (30) must be divisible by train.micro_batch_size x data-parallel size (8 x 1)"),
    (["parallel.tp=2"], 3, "world size 3 must be a multiple of parallel.tp x parallel.pp (2 x 1 = 2)"),
    (["model.hiden_size=64"], 1, "unknown key 'model.hiden_size'; did you mean 'model.hidden_size'?"),
    (["trian.tokens=1M"], 1, "unknown key 'trian"),
    (["model.num_layers=four"], 1, "model.num_layers"),
    (["train.tokens=lots"], 1, "train.tokens: 'lots' is not a count"),
    (["data.train=[missing/prefix]"], 1, "data.train: missing/prefix.bin/.idx not found"),
    (["data.tokenizer=nowhere.model"], 1, "data.tokenizer: nowhere.model not found"),
    (["schedule.b=0.5"], 1, "schedule.b must be negative"),
    (["schedule.a=0"], 1, "schedule.a must be positive"),
    (["schedule.kind=triangle"], 1, "schedule.kind 'triangle' is unknown"),
    (["schedule.decay_shape=cubic"], 1, "schedule.decay_shape 'cubic' is unknown"),
    (["schedule.warmup=3M", "schedule.decay=2M"], 1, "exceed the token budget train.tokens (4,000,000)"),
    (["train.tokens=100"], 1, "train.tokens (100) is less than one step"),
    (["name=a/b"], 1, "name 'a/b' must be letters"),
    (["model.num_query_groups=3"], 1, "model.num_attention_heads (4) must be divisible by model.num_query_groups (3)"),
    (["tokens"], 1, "override 'tokens' is not of the form key=value"),
    (["parallel.ep=2"], 2, "parallel.ep (2) needs a MoE model"),
    (["model.num_experts=4", "model.moe_ffn_hidden_size=64", "parallel.ep=3"], 3, "model.num_experts (4) must be divisible by parallel.ep (3)"),
    (["model.num_experts=4", "model.moe_ffn_hidden_size=64", "parallel.tp=2"], 2, "MoE with parallel.tp > 1 needs parallel.sequence_parallel=true"),
    (["model.num_experts=4", "model.moe_ffn_hidden_size=64", "model.moe_topk=5"], 1, "model.moe_topk (5) must be between 1 and model.num_experts (4)"),
    (["mup.width_mult=2"], 1, "mup.enabled needs exactly one of mup.base_width and mup.width_mult"),
    (["train.noise_scale_interval=10", "train.micro_batch_size=8", "train.global_batch_size=16"], 2,
     "train.noise_scale_interval needs at least parallel.pp + 1 = 2 micro-batches per data-parallel rank"),
    (["train.noise_scale_interval=10", "parallel.pp=2", "train.micro_batch_size=8", "train.global_batch_size=16"], 2,
     "train.noise_scale_interval needs at least parallel.pp + 1 = 3 micro-batches per data-parallel rank"),
]


@pytest.mark.parametrize("overrides,world_size,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_override_is_refused_with_its_message(default_data, overrides, world_size, message):
    with pytest.raises(ConfigError) as err:
        load_config("proxy", overrides, world_size)
    assert message in str(err.value)


def test_unknown_recipe_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown recipe 'proxi' \\(did you mean 'proxy'\\?\\)"):
        load_config("proxi")


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="recipe file nowhere.yaml does not exist"):
        load_config("nowhere.yaml")


def test_every_problem_is_reported_at_once(default_data):
    with pytest.raises(ConfigError) as err:
        load_config("proxy", ["schedule.a=-1", "schedule.b=1", "parallel.pp=3"], 3)
    assert len(str(err.value).splitlines()) == 3


def test_cli_refuses_before_any_work(default_data, tmp_path):
    result = subprocess.run(
        [str(BIN / "megatron-power"), "train", "proxy", f"out_dir={tmp_path}", "parallel.pp=3"],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: model.num_layers (4) must be divisible by parallel.pp (3)",
        "error: world size 1 must be a multiple of parallel.tp x parallel.pp (1 x 3 = 3)"]
    assert list(tmp_path.iterdir()) == []  # no run directory, no process group, nothing written


def test_counts_accept_suffixes_and_scientific_notation():
    assert parse_count("250B") == 250 * 10**9
    assert parse_count("1.5T") == 15 * 10**11
    assert parse_count("1e12") == 10**12
    assert parse_count("4M") == 4 * 10**6
    assert parse_count(0.05) == 0.05
    with pytest.raises(ValueError):
        parse_count("1.5")  # neither a whole count nor a fraction below 1
