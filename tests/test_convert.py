"""Conversion to and from Hugging Face: checkpoints trained under TP=2, PP=2 and EP=2 become
Granite / GraniteMoe directories that transformers loads and whose logits equal Megatron's; the
way back is bit for bit; training continues from an imported model in another layout."""

import json

import pytest
import torch

from helpers import SHAKESPEARE, megatron_power, metrics, run_train
from megatron_power import cli

STEPS = 6
SHAPE = ["model.hidden_size=128", "model.ffn_hidden_size=384", "model.num_layers=2", "model.seq_length=128",
         "train.global_batch_size=16", "train.micro_batch_size=8", f"train.tokens={STEPS * 16 * 128}",
         "train.eval_interval=1000", "train.log_interval=1", "checkpoint.interval=1000"]
LAYOUTS = {
    # muP with CompleteP's depth rules (2 layers on a base of 1), tied embeddings, grouped-query attention
    "tp2-dense": (2, ["parallel.tp=2", "model.num_query_groups=2", "mup.depth_alpha=1", "mup.base_depth=1"]),
    # standard parametrization, untied embeddings
    "pp2-dense-sp-untied": (2, ["parallel.pp=2", "mup.enabled=false", "model.tie_embeddings=false"]),
    # GraniteMoe: muP given as a width multiplier, grouped-query attention
    "ep2-moe": (2, ["parallel.ep=2", "model.num_experts=4", "model.moe_topk=2", "model.moe_ffn_hidden_size=128",
                    "model.num_query_groups=2", "mup.base_width=null", "mup.width_mult=2"]),
}
DTYPES = {"tp2-dense": "fp32", "pp2-dense-sp-untied": "fp32", "ep2-moe": "bf16"}


def convert(*args, check=True):
    return megatron_power("convert", *args, check=check)


@pytest.fixture(scope="module")
def trained(default_data, tmp_path_factory):
    """name -> (run directory, its overrides), each trained a few steps in its layout."""
    out = tmp_path_factory.mktemp("convert")
    runs = {}
    for name, (nproc, layout) in LAYOUTS.items():
        run_train(out, name, SHAPE + layout, nproc=nproc)
        runs[name] = (out / name, SHAPE + layout)
    return runs


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """name -> Hugging Face directory and the verified logit difference (--verify rounds the
    Megatron weights to the written dtype, so bf16 is held to the same tolerance)."""
    out = tmp_path_factory.mktemp("hf")
    result = {}
    for name, (run_dir, _) in trained.items():
        # A run folder names its latest checkpoint, as its checkpoints directory does (and as merge takes it).
        source = run_dir if name == "ep2-moe" else run_dir / "checkpoints"
        stdout = convert("to-hf", source, out / name, "--dtype", DTYPES[name], "--verify").stdout
        difference = float(stdout.split("largest logit difference")[1].split()[0])
        result[name] = (out / name, difference)
    return result


@pytest.mark.parametrize("name", LAYOUTS)
def test_exported_model_loads_and_matches_megatron(exported, name):
    from transformers import AutoModelForCausalLM

    hf_dir, difference = exported[name]
    # Relative to the largest logit; seen on megatron-core 0.19.2 with its native muP multipliers:
    # 2.9e-7 (tp2-dense), 4.5e-7 (pp2-dense-sp-untied), 2.8e-7 (ep2-moe, bf16 weights).
    assert difference < 1e-6
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    assert type(model).__name__ == ("GraniteMoeForCausalLM" if "moe" in name else "GraniteForCausalLM")
    if name == "tp2-dense":  # CompleteP's depth factor 1/2 folded into Granite's one residual multiplier
        assert model.config.residual_multiplier == pytest.approx(0.22 / 2)
    prompt = torch.tensor([[5, 6, 7, 8]])
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 10) and torch.equal(generated[:, :4], prompt)


def test_exported_tokenizer_encodes_as_sentencepiece(exported, default_data):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(default_data / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(exported["tp2-dense"][0])
    shakespeare = SHAKESPEARE.read_text()
    texts = [shakespeare[i:i + 400] for i in range(0, 200_000, 2_000)]
    texts += [" leading space", "  two\n\n\tindented  code: x = 12345  ", "ü 漢字 😀", "", "   "]
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text), repr(text)
        assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (sp.eos_id(), sp.pad_id())


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    """name -> the exported Hugging Face directory imported back into a checkpoint."""
    out = tmp_path_factory.mktemp("imported")
    for name in ("tp2-dense", "ep2-moe"):
        convert("from-hf", exported[name][0], out / name)
    return {name: out / name for name in ("tp2-dense", "ep2-moe")}


@pytest.mark.parametrize("name", ["tp2-dense", "ep2-moe"])
def test_hf_megatron_hf_is_bit_exact(exported, imported, tmp_path, name):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    first, second = exported[name][0], tmp_path / "second"
    # The way back again, in shards of at most 256 KiB: many files and one index.
    convert("to-hf", imported[name], second, "--dtype", DTYPES[name], "--max-shard-gb", 2**-12)
    assert len(list(second.glob("*.safetensors"))) > 2
    a = {k: v for f in first.glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in second.glob("*.safetensors") for k, v in load_file(f).items()}
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    loaded = AutoModelForCausalLM.from_pretrained(str(second), dtype=torch.float32).state_dict()
    assert torch.equal(loaded["model.embed_tokens.weight"], a["model.embed_tokens.weight"].float())
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())


def test_training_continues_from_imported_model_in_another_layout(trained, imported, tmp_path):
    """Weights from a TP=2 run, through Hugging Face, into a PP=2 run: its first loss is the
    trained model's, not a fresh model's."""
    run_dir, overrides = trained["tp2-dense"]
    layout = [o for o in overrides if not o.startswith("parallel.")]
    layout += ["parallel.pp=2", f"checkpoint.init_from={imported['tp2-dense']}"]
    result = run_train(tmp_path, "continued", layout + [f"train.tokens={2 * 16 * 128}"], nproc=2)
    assert "from the weights of" in result.stdout + result.stderr
    source = metrics(run_dir)[0]
    continued = metrics(tmp_path / "continued")[0]
    assert source[1] > source[STEPS] + 0.5  # the source run learned something
    assert continued[1] < source[1] - 0.5  # and the continued run starts from what it learned


def _main(capsys, *args):
    code = cli.main(["convert", *map(str, args)])
    return code, capsys.readouterr().err


def test_bad_inputs_fail_with_one_line_and_write_nothing(trained, exported, tmp_path, capsys):
    hf_dir = exported["tp2-dense"][0]
    out = tmp_path / "out"

    code, err = _main(capsys, "to-hf", tmp_path, out)
    assert code == 2 and "holds no checkpoint" in err and not out.exists()

    code, err = _main(capsys, "to-hf", exported["tp2-dense"][0], out, "--max-shard-gb", "0")
    assert code == 2 and "--max-shard-gb 0 (expected a positive size in GiB)" in err and not out.exists()

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    code, err = _main(capsys, "from-hf", hf_dir, occupied)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]

    code, err = _main(capsys, "from-hf", hf_dir, out, "--recipe", "proxy")
    assert code == 2 and "recipe proxy does not match the weights" in err and "model.num_layers: expected 4, found 2" in err
    assert not out.exists()

    llama = tmp_path / "llama"
    llama.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    code, err = _main(capsys, "from-hf", llama, out)
    assert code == 2 and "architecture LlamaForCausalLM is not supported" in err and not out.exists()

    code, err = _main(capsys, "from-hf", tmp_path / "missing", out)
    assert code == 2 and "is not a directory" in err

    ckpt = trained["tp2-dense"][0] / "checkpoints"
    code, err = _main(capsys, "to-hf", ckpt, out, "--tokenizer", hf_dir / "config.json")
    assert code == 2 and f"tokenizer: {hf_dir / 'config.json'} is not a sentencepiece model (" in err
    code, err = _main(capsys, "to-hf", ckpt, out, "--tokenizer", tmp_path / "missing.model")
    assert code == 2 and "(given by --tokenizer) does not exist" in err and not out.exists()

    # An output that cannot be created (/proc refuses new folders, even to root), both ways.
    for direction, source in (("to-hf", trained["tp2-dense"][0] / "checkpoints"), ("from-hf", hf_dir)):
        code, err = _main(capsys, direction, source, "/proc/forbidden/out")
        assert code == 2 and err.splitlines() == [
            "error: output directory /proc/forbidden/out cannot be written: /proc is not writable "
            "(No such file or directory)"], err


def test_truncated_checkpoint_fails_with_one_line_and_writes_nothing(trained, tmp_path, capsys):
    import shutil

    source = next((trained["tp2-dense"][0] / "checkpoints").glob("iter_*"))
    damaged = tmp_path / source.name
    shutil.copytree(source, damaged)
    largest = max(damaged.glob("*.distcp"), key=lambda f: f.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 2)
    code, err = _main(capsys, "to-hf", damaged, tmp_path / "out")
    assert code == 2 and f"{largest} is missing or shorter than" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


def test_failed_import_leaves_nothing_behind(exported, tmp_path):
    """A tensor missing from the weights is found after the work has started: the partial
    output is removed."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(exported["tp2-dense"][0], broken)
    (shard,) = broken.glob("*.safetensors")
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    result = convert("from-hf", broken, tmp_path / "out", check=False)
    assert result.returncode == 2
    assert "lack model.layers.1.mlp.up_proj.weight" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_import_into_a_depth_scaled_recipe_divides_the_depth_factor_out(exported, tmp_path):
    """Granite's one residual multiplier holds CompleteP's depth factor; a recipe with the same depth
    rules takes Granite's own multiplier back, so its model multiplies by the exported value again."""
    from megatron_power.convert.from_hf import read_hf_config, target_config
    from megatron_power.training import mup

    recipe = tmp_path / "deep.yaml"
    recipe.write_text("base: proxy\nmodel: {hidden_size: 128, ffn_hidden_size: 384, num_layers: 2, num_query_groups: 2, "
                      "seq_length: 128}\nmup: {depth_alpha: 1, base_depth: 1}\n")
    config = target_config(read_hf_config(exported["tp2-dense"][0]), str(recipe), "deep")
    assert config.mup.residual_mult == pytest.approx(0.22) and mup.residual_mult(config) == pytest.approx(0.11)


def test_a_config_json_is_read_by_its_model_type_and_one_missing_a_field_is_one_line():
    """Hugging Face reads a config.json without `architectures` by its model_type; one without a
    shape field was a KeyError traceback."""
    from transformers import GraniteConfig

    from megatron_power.convert import granite
    from megatron_power.errors import ConversionError

    hf = GraniteConfig(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, intermediate_size=384,
                       vocab_size=256, attention_multiplier=1 / 64, architectures=["GraniteForCausalLM"]).to_dict()
    assert granite.model_settings({**hf, "architectures": None}) == granite.model_settings(hf)
    with pytest.raises(ConversionError) as e:
        granite.model_settings({k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    assert str(e.value) == ("config.json names no architecture (expected architectures GraniteForCausalLM or "
                            "GraniteMoeForCausalLM, or model_type granite or granitemoe)")
    with pytest.raises(ConversionError) as e:
        granite.model_settings({k: v for k, v in hf.items() if k not in ("hidden_size", "vocab_size")})
    assert str(e.value) == "config.json lacks hidden_size, vocab_size (a GraniteForCausalLM config names them)"
