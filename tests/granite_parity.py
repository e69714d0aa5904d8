"""Run by test_mup.py in its own process: a Megatron GPTModel with muP against Hugging Face's
GraniteForCausalLM holding the same weights. Prints the largest relative logit difference."""

import sys

import torch

from megatron_power import runtime
from megatron_power.config import load_config
from megatron_power.convert import granite
from megatron_power.data import TokenizerInfo
from megatron_power.model import build_model


def main():
    config = load_config("proxy", sys.argv[1:])
    runtime.initialize(config)
    vocab = TokenizerInfo.from_sentencepiece(config.data.tokenizer).vocab_size
    model = build_model(config, vocab).eval()
    from transformers import GraniteForCausalLM

    hf = GraniteForCausalLM(granite.hf_config(config, vocab)).eval()
    missing, unexpected = hf.load_state_dict(granite.to_hf(model.state_dict(), config, vocab), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    tokens = torch.randint(0, vocab, (2, config.model.seq_length), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(config.model.seq_length).expand(2, -1)
    with torch.no_grad():
        ours = model(tokens, positions, None)[..., :vocab]
        theirs = hf(input_ids=tokens).logits
    print(f"max_rel_diff {float((ours - theirs).abs().max() / theirs.abs().max()):.3e}")
    runtime.shutdown()


if __name__ == "__main__":
    main()
