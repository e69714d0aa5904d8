"""Corpus files -> sentencepiece tokenizer and Megatron indexed datasets, read back by
Megatron-Core; bad input reported by file and line; blends sampled in proportion."""

import gzip
import json

import numpy as np
import pytest
import sentencepiece as spm

from helpers import SHAKESPEARE
from megatron_power import cli


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Shakespeare's speeches as documents, written in every input format."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    out = tmp_path_factory.mktemp("corpus")
    speeches = [s for s in SHAKESPEARE.read_text().split("\n\n") if s.strip()][:3000]
    parts = np.array_split(np.arange(len(speeches)), 4)
    lines = [[json.dumps({"id": int(i), "text": speeches[i]}) + "\n" for i in p] for p in parts]
    (out / "a.jsonl").write_text("".join(lines[0]))
    with gzip.open(out / "b.jsonl.gz", "wt") as f:
        f.write("".join(lines[1]))
    (out / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(lines[2]).encode()))
    pq.write_table(pa.table({"text": [speeches[i] for i in parts[3]]}), out / "d.parquet")
    (out / "e.txt").write_text(speeches[0])
    files = [out / n for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e.txt")]
    return files, [speeches[i] for p in parts for i in p] + [speeches[0]]


def run_cli(*args):
    return cli.main([*map(str, args)])


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    files, _ = corpus
    prefix = tmp_path_factory.mktemp("tok") / "shakespeare"
    assert run_cli("tokenizer", *files, "--out", prefix, "--vocab-size", 2000, "--special-tokens", "<|code|>") == 0
    return prefix.with_suffix(".model")


def test_a_tokenizer_is_never_trained_over_an_existing_one(corpus, tokenizer, capsys):
    """Datasets encoded with a tokenizer silently change meaning if its model is replaced."""
    before = tokenizer.read_bytes()
    assert run_cli("tokenizer", *corpus[0], "--out", tokenizer.with_suffix(""), "--vocab-size", 2000) == 2
    assert capsys.readouterr().err == (f"error: --out {tokenizer.with_suffix('')}: {tokenizer} exists (datasets "
                                       f"encoded with it would no longer match its ids); give another prefix, "
                                       f"or delete it first\n")
    assert tokenizer.read_bytes() == before


def read_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_every_format_encodes_as_sentencepiece_for_any_number_of_workers(corpus, tokenizer, tmp_path):
    files, texts = corpus
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    assert sp.piece_to_id("<|code|>") != sp.unk_id() and sp.encode("a <|code|> b").count(sp.piece_to_id("<|code|>")) == 1
    for workers in (1, 2):
        assert run_cli("preprocess", *files, "--tokenizer", tokenizer, "--out", tmp_path / f"w{workers}",
                       "--workers", workers) == 0
    assert (tmp_path / "w1.bin").read_bytes() == (tmp_path / "w2.bin").read_bytes()
    assert (tmp_path / "w1.idx").read_bytes() == (tmp_path / "w2.idx").read_bytes()
    expected = [ids + [sp.eos_id()] for ids in sp.encode(texts)]
    assert read_documents(tmp_path / "w1") == expected


def test_validation_split_and_rerun_skips_complete_output(corpus, tokenizer, tmp_path, capsys):
    files, texts = corpus
    out = tmp_path / "split"
    assert run_cli("preprocess", *files, "--tokenizer", tokenizer, "--out", out, "--valid-fraction", 0.1) == 0
    train, valid = read_documents(out), read_documents(tmp_path / "split_valid")
    assert len(train) + len(valid) == len(texts) and 0.05 < len(valid) / len(texts) < 0.15
    stamp = out.with_suffix(".bin").stat().st_mtime_ns
    capsys.readouterr()
    assert run_cli("preprocess", *files, "--tokenizer", tokenizer, "--out", out, "--valid-fraction", 0.1) == 0
    assert "already complete" in capsys.readouterr().out
    assert out.with_suffix(".bin").stat().st_mtime_ns == stamp


@pytest.fixture
def bad_corpus(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b"".join([
        b'{"text": "good one"}\n',
        b'{"text": "broken\n',                 # line 2: malformed JSON
        b'{"content": "no text field"}\n',     # line 3
        b'{"text": "\xff\xfe bad bytes"}\n',   # line 4: invalid UTF-8
        b'{"text": ""}\n',                     # line 5: empty document
        b'{"text": "good two"}\n',
    ]))
    (tmp_path / "empty.jsonl").write_text("")
    return [tmp_path / "bad.jsonl", tmp_path / "empty.jsonl"]


def test_bad_input_is_counted_and_skipped_with_file_and_line(bad_corpus, tokenizer, tmp_path, capsys):
    assert run_cli("preprocess", *bad_corpus, "--tokenizer", tokenizer, "--out", tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "train: 2 documents" in out
    for kind in ("1 malformed JSON", "1 no text field 'text'", "1 invalid UTF-8", "1 empty document", "1 empty file"):
        assert kind in out, out
    assert f"{bad_corpus[0]}:2: malformed JSON" in out
    assert len(read_documents(tmp_path / "out")) == 2


def test_bad_input_stops_with_on_error_stop_and_writes_nothing(bad_corpus, tokenizer, tmp_path, capsys):
    code = run_cli("preprocess", *bad_corpus, "--tokenizer", tokenizer, "--out", tmp_path / "out", "--on-error", "stop")
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: {bad_corpus[0]}:2: malformed JSON (pass --on-error skip to skip such documents)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.jsonl"]


@pytest.mark.parametrize("args,message", [
    (["missing.jsonl", "--tokenizer", "TOKENIZER"], "missing.jsonl: no such file"),
    (["notes.csv", "--tokenizer", "TOKENIZER"], "notes.csv: unknown format"),
    (["notes.txt", "--tokenizer", "notes.txt"], "notes.txt is not a sentencepiece model ("),
    (["notes.txt", "--tokenizer", "TOKENIZER", "--workers", "0"], "--workers must be at least 1, got 0"),
], ids=["missing", "format", "not-a-tokenizer", "no-workers"])
def test_bad_paths_and_options_fail_before_any_work(tokenizer, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "notes.txt").write_text("To be, or not to be.\n")
    args = [tokenizer if a == "TOKENIZER" else a for a in args]
    assert run_cli("preprocess", *args, "--out", tmp_path / "out") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert not (tmp_path / "out.bin").exists()


def test_recipe_blend_samples_in_proportion(corpus, tokenizer, tmp_path):
    """A recipe's `data.train: [1, first, 3, second]` through Megatron's blended dataset builder."""
    from megatron_power.config import load_config
    from megatron_power.training.data import TokenizerInfo, build_datasets

    files, _ = corpus
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli("preprocess", *files[:2], "--tokenizer", tokenizer, "--out", first) == 0
    assert run_cli("preprocess", *files[2:4], "--tokenizer", tokenizer, "--out", second) == 0
    config = load_config("proxy", [f"data.train=[1,{first},3,{second}]", f"data.valid=[{first}]",
                                   f"data.tokenizer={tokenizer}", "model.seq_length=64", "train.tokens=256000",
                                   f"out_dir={tmp_path}"])
    import torch.distributed as dist

    from megatron_power.training.runtime import _free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        train, _ = build_datasets(config, TokenizerInfo.from_sentencepiece(str(tokenizer)))
    finally:
        dist.destroy_process_group()
    shares = np.bincount(train.dataset_index, minlength=2) / len(train)
    assert shares == pytest.approx([0.25, 0.75], abs=0.01)


def _sample_starts(dataset, first: int, count: int) -> list:
    """(document id, token offset) where each of samples [first, first + count) of a GPTDataset
    begins: the sample's identity whatever order or size the dataset was built with."""
    starts = []
    for k in range(first + dataset.skip, first + dataset.skip + count):
        doc_position, offset = dataset.sample_index[dataset.shuffle_index[k]]
        starts.append((int(dataset.document_index[doc_position]), int(offset)))
    return starts


def test_stage_two_continues_the_stage_one_data_past_what_stage_one_read(default_data, tmp_path):
    """Stage 1 reads the corpus alone; stage 2 blends it 0.7 / 0.3 with other data and reads, of
    the stage-1 corpus, exactly the samples that come after stage 1's in stage 1's own order."""
    import torch.distributed as dist

    from megatron_power.config import load_config, parse_blend
    from megatron_power.training.continued_dataset import dataset_key, samples_read
    from megatron_power.training.data import TokenizerInfo, build_datasets
    from megatron_power.training.runtime import _free_port

    common = ["model.seq_length=128", "train.global_batch_size=16", "train.micro_batch_size=4",
              f"out_dir={tmp_path}"]
    stage1 = load_config("proxy", common + ["train.tokens=409600", "name=stage1"])  # 200 steps of 16 x 128
    stage2 = load_config("proxy", common + ["train.tokens=819200", "name=stage2", "train.stage=2",
                                            f"checkpoint.init_from={tmp_path}", "schedule.decay=409600",
                                            "data.train=[0.7,data/stdlib/train,0.3,data/stdlib/valid]"],
                         check_paths=False)
    read = 200 * 16
    before = samples_read(parse_blend(stage1.data.train, "data.train"), read, {})
    corpus = dataset_key(stage1.data.train[0])
    assert before == {corpus: read}
    tokenizer = TokenizerInfo.from_sentencepiece(stage1.data.tokenizer)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        first, _ = build_datasets(stage1, tokenizer)
        second, _ = build_datasets(stage2, tokenizer, before)
    finally:
        dist.destroy_process_group()

    samples = 200 * 16  # stage 2's own
    from_corpus = second.dataset_sample_index[:samples][second.dataset_index[:samples] == 0]
    assert list(from_corpus) == list(range(len(from_corpus)))  # in order, from the first unread one
    continued = second.datasets[0]
    assert (continued.skip, continued.epochs) == (read, 1)
    stage1_read = _sample_starts(first, 0, read)
    stage2_read = _sample_starts(continued, 0, len(from_corpus))
    assert len(set(stage1_read)) == read
    assert not set(stage1_read) & set(stage2_read)
    # The continuation is stage 1's own order: what stage 1 would have read next.
    assert stage2_read == _sample_starts(first, read, len(from_corpus))


def test_stage_two_past_one_epoch_of_stage_one_data_says_so(default_data, tmp_path):
    """Stage 1 read 25,000 of the corpus's ~26,100 samples of 128 tokens: stage 2's share takes its
    dataset into a second epoch, which Megatron reshuffles as a whole, and the run is told."""
    import torch.distributed as dist

    from megatron_power.config import load_config
    from megatron_power.training.continued_dataset import dataset_key, reordered
    from megatron_power.training.data import TokenizerInfo, build_datasets
    from megatron_power.training.runtime import _free_port

    stage2 = load_config("proxy", ["model.seq_length=128", "train.global_batch_size=16", "train.micro_batch_size=4",
                                   f"out_dir={tmp_path}", "train.tokens=819200", "train.stage=2",
                                   f"checkpoint.init_from={tmp_path}", "schedule.decay=409600",
                                   "data.train=[0.7,data/stdlib/train,0.3,data/stdlib/valid]"], check_paths=False)
    corpus = dataset_key(stage2.data.train[1])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        train, _ = build_datasets(stage2, TokenizerInfo.from_sentencepiece(stage2.data.tokenizer), {corpus: 25_000})
    finally:
        dist.destroy_process_group()
    assert (train.datasets[0].skip, train.datasets[0].epochs) == (25_000, 2)
    assert [dataset_key(p) for p in reordered(train)] == [corpus]


@pytest.mark.parametrize("vocab_size,says", [(50_000, "this corpus gives at most"),
                                             (265, "this corpus needs at least")], ids=["too-high", "too-low"])
def test_a_vocabulary_the_corpus_cannot_fill_or_hold_is_one_line_naming_one_it_can(tmp_path, capsys, vocab_size, says):
    corpus = tmp_path / "small.txt"
    corpus.write_text("To be, or not to be, that is the question.\n\nWhether 'tis nobler in the mind to suffer\n")
    assert run_cli("tokenizer", corpus, "--out", tmp_path / "tok", "--vocab-size", vocab_size) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --vocab-size {vocab_size}: {says} "), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt"]
    # The size it names is one sentencepiece trains at.
    named = int(line.split(says)[1].split()[0])
    assert run_cli("tokenizer", corpus, "--out", tmp_path / "tok", "--vocab-size", named) == 0
    assert (tmp_path / "tok.model").is_file()


def test_data_built_with_another_vocabulary_is_refused_not_reused(default_data, capsys):
    """`data --vocab-size` names the tokenizer the user wants; data already there with another one
    must not be handed back as if it were that (nor rebuilt over: runs read it)."""
    manifest = (default_data / "manifest.json").read_bytes()
    built = json.loads(manifest)["vocab_size"]
    assert run_cli("data", "--out", default_data, "--vocab-size", built // 2) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --out {default_data} holds data built with --vocab-size {built}, not {built // 2}: give another "
        f"--out, or delete {default_data} first"]
    assert (default_data / "manifest.json").read_bytes() == manifest
    assert run_cli("data", "--out", default_data, "--vocab-size", built) == 0
    assert run_cli("data", "--out", default_data) == 0
    assert capsys.readouterr().out.startswith(f"data present in {default_data}: ")


def test_data_is_never_built_over_files_it_did_not_write(tmp_path, capsys):
    """`data --out` a folder of one's own datasets (named as `preprocess` names them) would replace them."""
    (tmp_path / "train.bin").write_text("mine")
    assert run_cli("data", "--out", tmp_path) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --out {tmp_path} holds files that `data` did not write (train.bin); give a new or empty folder"]
    assert [p.name for p in tmp_path.iterdir()] == ["train.bin"] and (tmp_path / "train.bin").read_text() == "mine"


def test_a_special_token_given_twice_is_one_line_before_any_work(tmp_path, capsys):
    corpus = tmp_path / "small.txt"
    corpus.write_text("To be, or not to be.\n")
    args = ["--out", tmp_path / "tok", "--vocab-size", 300, "--special-tokens", "<code>,<doc>,<code>"]
    assert run_cli("tokenizer", corpus, *args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --special-tokens: <code> given more than once (each piece once)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt"]
