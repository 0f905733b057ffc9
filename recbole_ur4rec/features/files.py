"""Readers of the user's feature inputs: atomic tables (.item, description TSV), JSONL descriptions and
feature files (.pt / .npy + tokens). Each returns tokens in file order with where each row came from,
and fails with a :class:`FeatureError` naming the file and the rows.
"""

import io
import json
import os

import numpy as np
import torch

from recbole_ur4rec.data.atomic import check_atomic_file
from recbole_ur4rec.features.errors import FeatureError

TOKENS_SUFFIX = ".tokens.txt"
MAX_LISTED = 10


def rows_message(path, what, where):
    """``'<path>: <what> (<n> row(s): line 3, line 9, ...)'``."""
    listed = ", ".join(where[:MAX_LISTED]) + (", ..." if len(where) > MAX_LISTED else "")
    return f"{path}: {what} ({len(where)} row(s): {listed})"


def _check_nonempty_file(path, what):
    if not os.path.isfile(path):
        raise FeatureError(f"{what} {path} does not exist")
    if os.path.getsize(path) == 0:
        raise FeatureError(f"{what} {path} is empty")


def _check_unique(path, tokens, where, field):
    seen = {}
    duplicates = []
    for token, place in zip(tokens, where):
        if token in seen:
            duplicates.append(f"{place} repeats {field} {token!r} of {seen[token]}")
        else:
            seen[token] = place
    if duplicates:
        raise FeatureError(rows_message(path, f"duplicate {field} tokens, each must have one row", duplicates))


def read_atomic_table(path, id_field, field_separator="\t", seq_separator=" "):
    """A RecBole atomic file as ``(fields, rows, where)``: ``fields`` maps name to type, ``rows`` are dicts of
    strings (token_seq values split into lists), ``where`` labels each row ``'line N'``. ``id_field`` must be a
    column and unique.
    """
    _check_nonempty_file(path, "atomic file")
    try:
        check_atomic_file(path, field_separator, seq_separator, required_fields=[id_field])
        with open(path, "r", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (UnicodeDecodeError, OSError) as err:
        raise FeatureError(f"{path}: unreadable as a UTF-8 text file ({err})") from None
    fields = dict(column.split(":", 1) for column in lines[0].split(field_separator))
    rows, where = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        values = dict(zip(fields, line.split(field_separator)))
        for name, ftype in fields.items():
            if ftype == "token_seq":
                values[name] = [token for token in values[name].split(seq_separator) if token]
        rows.append(values)
        where.append(f"line {number}")
    if not rows:
        raise FeatureError(f"{path}: holds a header but no rows")
    _check_unique(path, [row[id_field] for row in rows], where, id_field)
    return fields, rows, where


def read_text_file(path, id_field, field_separator="\t", seq_separator=" "):
    """Texts keyed by token from a description file, as ``(tokens, texts, where)``.

    Formats, chosen by the file name:

    - ``*.jsonl``: one JSON object a line, ``{"<id_field>": "<token>", "text": "<text>"}``;
    - anything else: a RecBole atomic file with two columns, ``<id_field>:token`` and ``text:token_seq``
      (tab-separated, one header line).
    """
    if path.endswith(".jsonl"):
        tokens, texts, where = _read_jsonl(path, id_field)
    else:
        fields, rows, where = read_atomic_table(path, id_field, field_separator, seq_separator)
        if list(fields) != [id_field, "text"]:
            expected = f"{id_field}:token{field_separator}text:token_seq"
            raise FeatureError(f"{path}: header must be {expected!r}, got fields {list(fields)}")
        tokens = [row[id_field] for row in rows]
        texts = [" ".join(row["text"]) if isinstance(row["text"], list) else row["text"] for row in rows]
    blank = [place for place, text in zip(where, texts) if not text.strip()]
    if blank:
        raise FeatureError(rows_message(path, "empty text", blank))
    return tokens, texts, where


def _read_jsonl(path, id_field):
    _check_nonempty_file(path, "description file")
    tokens, texts, where, bad = [], [], [], []
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (UnicodeDecodeError, OSError) as err:
        raise FeatureError(f"{path}: unreadable as a UTF-8 text file ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or id_field not in record:
            bad.append(f"line {number}")
            continue
        tokens.append(str(record[id_field]))
        texts.append(record["text"])
        where.append(f"line {number}")
    if bad:
        raise FeatureError(
            rows_message(path, f'lines that are not JSON objects {{"{id_field}": ..., "text": "..."}}', bad)
        )
    if not tokens:
        raise FeatureError(f"{path}: holds no descriptions")
    _check_unique(path, tokens, where, id_field)
    return tokens, texts, where


def read_feature_file(path, kind):
    """A feature file as ``(tokens, features)``, ``features`` a float32 ``[N, d]`` tensor in token order.

    Formats: ``.pt`` holding ``{'<kind>_tokens': [str, ...], 'features': Tensor[N, d]}`` (read with
    ``weights_only=True``), or ``.npy`` (``[N, d]`` floats) beside ``<stem>.tokens.txt`` (one token a line).
    ``kind`` is ``'item'`` or ``'user'``. NaN or infinite rows are an error.
    """
    _check_nonempty_file(path, "feature file")
    key = f"{kind}_tokens"
    if path.endswith(".npy"):
        tokens_path = path[: -len(".npy")] + TOKENS_SUFFIX
        _check_nonempty_file(tokens_path, f"token file of {path}:")
        try:
            features = torch.from_numpy(np.load(path, allow_pickle=False))
            with open(tokens_path, "r", encoding="utf-8") as f:
                tokens = [line.rstrip("\r\n") for line in f if line.strip()]
        except (ValueError, OSError, UnicodeDecodeError) as err:
            raise FeatureError(f"{path}: unreadable .npy features or {tokens_path} ({err})") from None
        source_of_tokens = tokens_path
    else:
        try:
            with open(path, "rb") as f:
                state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged pickle stream fails in many ways (IndexError, EOFError, ...)
            raise FeatureError(f"{path}: corrupt or not a torch file of tensors and plain data ({err})") from None
        if not isinstance(state, dict) or key not in state or "features" not in state:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise FeatureError(f"{path}: expected a dict with keys {key!r} and 'features', found {found}")
        tokens, features = state[key], state["features"]
        source_of_tokens = f"{path}[{key!r}]"
        if not torch.is_tensor(features):
            raise FeatureError(f"{path}: 'features' must be a tensor, found {type(features).__name__}")
    if features.dim() != 2 or not features.is_floating_point():
        raise FeatureError(
            f"{path}: features must be a 2-d float array [rows, dim], found {tuple(features.shape)} {features.dtype}"
        )
    if not isinstance(tokens, list) or len(tokens) != features.shape[0]:
        n = len(tokens) if isinstance(tokens, list) else type(tokens).__name__
        raise FeatureError(f"{path}: {features.shape[0]} feature rows but {n} tokens in {source_of_tokens}")
    if features.shape[0] == 0:
        raise FeatureError(f"{path}: holds no feature rows")
    tokens = [str(token) for token in tokens]
    where = [f"row {i} ({token!r})" for i, token in enumerate(tokens)]
    _check_unique(path, tokens, where, f"{kind}")
    features = features.float()
    bad = (~torch.isfinite(features).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise FeatureError(rows_message(path, "NaN or infinite values", [where[i] for i in bad]))
    return tokens, features


def write_feature_file(path, kind, tokens, features):
    """Write ``{'<kind>_tokens': tokens, 'features': features}`` to ``path`` (.pt) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    torch.save({f"{kind}_tokens": list(tokens), "features": features.detach().cpu().float()}, tmp_path)
    os.replace(tmp_path, path)
