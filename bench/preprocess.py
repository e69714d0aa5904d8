"""Preprocessing throughput: `megatron-power preprocess` against the approach of Megatron-LM's
tools/preprocess_data.py, run side by side on the same JSON-lines corpus, tokenizer and number
of workers, with identical output required. Both run in this process (pool start-up included for
the baseline, interpreter start-up excluded for both).

The baseline, written here in a few lines: a multiprocessing pool whose workers each parse one
JSON line and encode it with sentencepiece, returning Python lists that the main process feeds,
one document at a time, to Megatron's IndexedDatasetBuilder (`pool.imap(..., chunksize=32)`).

usage: python bench/preprocess.py [--workers 2] [--copies 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_power.config import DEFAULT_DATA_DIR
from tokenizer import preprocess, sources

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SHAKESPEARE = ROOT / "tests" / "data" / "tinyshakespeare.txt"

_sp = None


def _baseline_init(model_file: str) -> None:
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model_file)


def _baseline_encode(line: str):
    ids = _sp.encode(json.loads(line)["text"])
    ids.append(_sp.eos_id())
    return ids


def baseline(corpus: Path, model_file: Path, prefix: Path, workers: int) -> None:
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    vocab = spm.SentencePieceProcessor(model_file=str(model_file)).vocab_size()
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16 if vocab < 65500 else np.int32)
    with open(corpus) as lines, mp.Pool(workers, _baseline_init, (str(model_file),)) as pool:
        for ids in pool.imap(_baseline_encode, lines, 32):
            builder.add_document(ids, [len(ids)])
    builder.finalize(f"{prefix}.idx")


def make_corpus(path: Path, copies: int) -> int:
    speeches = [s for s in SHAKESPEARE.read_text().split("\n\n") if s.strip()]
    with open(path, "w") as f:
        for copy in range(copies):
            for i, speech in enumerate(speeches):
                f.write(json.dumps({"id": f"{copy}-{i}", "text": speech}) + "\n")
    return copies * len(speeches)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--copies", type=int, default=8, help="copies of tinyshakespeare's speeches")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    subprocess.run([str(BIN / "megatron-power"), "data"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    model_file = DEFAULT_DATA_DIR / "tokenizer.model"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        documents = make_corpus(corpus, args.copies)
        times = {"baseline": [], "ours": []}
        for _ in range(args.repeats):  # alternating, best of each: both warm, same page cache
            start = time.perf_counter()
            baseline(corpus, model_file, tmp / "baseline", args.workers)
            times["baseline"].append(time.perf_counter() - start)
            start = time.perf_counter()
            preprocess.write_indexed_dataset(sources.documents([corpus]), model_file, tmp / "ours", args.workers,
                                             desc="megatron-power preprocess")
            times["ours"].append(time.perf_counter() - start)
        baseline_s, ours_s = min(times["baseline"]), min(times["ours"])
        same = all((tmp / f"ours{s}").read_bytes() == (tmp / f"baseline{s}").read_bytes() for s in (".bin", ".idx"))
        tokens = (tmp / "ours.bin").stat().st_size // 2
    print(f"{documents:,} documents, {tokens:,} tokens, {args.workers} workers; identical output: {same}")
    print(f"Megatron-LM's approach {baseline_s:.1f} s ({tokens / baseline_s:,.0f} tokens/s); "
          f"megatron-power preprocess {ours_s:.1f} s ({tokens / ours_s:,.0f} tokens/s)")
    print(f"speed ratio {baseline_s / ours_s:.2f} (target >= 2)")
    if not same:
        sys.exit("outputs differ")


if __name__ == "__main__":
    main()
