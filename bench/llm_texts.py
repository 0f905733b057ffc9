"""Benchmark: seconds per 1,000 LLM-written item texts (``recbole_ur4rec.features.llm``) on this machine.

No model can be downloaded here, so by default the model is GPT-2 small's architecture (124M parameters, 12 layers,
768 wide, 50,257-token output layer) with random weights and a byte-level BPE tokenizer trained on the dataset's item
texts: generation costs the same whatever the weights say, as every text runs the full ``llm_max_new_tokens`` (a
random model never stops early; a real one may). ``--model`` times a real local model instead.

    python bench/llm_texts.py --items 48                # GPT-2-small-sized random model, ml-100k item texts
    python bench/llm_texts.py --model /models/qwen2.5-0.5b-instruct --items 200
"""
import argparse
import json
import os
import platform
import tempfile
import time

import torch

from recbole_ur4rec.build import build
from recbole_ur4rec.common.argv import isolated_argv
from recbole_ur4rec.features.item_text import item_texts
from recbole_ur4rec.features.llm import LLMWriter


def gpt2_small_sized(folder, corpus):
    """A randomly initialised GPT-2-small-sized model and a BPE tokenizer trained on ``corpus``, saved in ``folder``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=8000, min_frequency=2, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--model", default=None, help="a local causal-LM folder; default: GPT-2-small-sized random model")
    parser.add_argument("--items", type=int, default=48, help="item texts to write (timed), first items of the dataset")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="a JSON file for the result")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with isolated_argv():
        config = build("SASRec", args.dataset, config_dict={"state": "WARNING", "epochs": 0}, log=False).config
    _, tokens, texts, _ = item_texts(config)
    work = tempfile.mkdtemp()
    model = args.model or gpt2_small_sized(os.path.join(work, "model"), texts)
    writer = LLMWriter(model, os.path.join(work, "cache.jsonl"), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    model_loaded, _ = writer._load()  # loading is timed apart
    begin = time.perf_counter()
    written, report = writer.write("item", tokens[: args.items], texts[: args.items])
    seconds = time.perf_counter() - begin
    parameters = sum(p.numel() for p in model_loaded.parameters())
    result = {
        "model": args.model or "GPT-2-small-sized (124M, random weights)", "parameters": parameters, "device": writer.device,
        "threads": args.threads, "items": args.items, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "seconds": seconds, "seconds_per_1000_items": seconds * 1000 / args.items, "cpus": os.cpu_count(),
        "platform": platform.platform(), "example": written[0],
    }
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
