"""Item text: the dataset's .item fields through a template, or a user-supplied description file."""

import os
import string

from recbole_ur4rec.features.errors import FeatureError
from recbole_ur4rec.features.files import read_atomic_table, read_text_file
from recbole_ur4rec.features.settings import item_text_template, setting


class _TemplateFormatter(string.Formatter):
    """``str.format`` where a token_seq field (a list) is joined by its format spec (a space by default)."""

    def format_field(self, value, format_spec):
        if isinstance(value, list):
            return (format_spec or " ").join(value)
        return super().format_field(value, format_spec)


def item_file(config):
    """Path of the dataset's ``.item`` atomic file."""
    return os.path.join(config["data_path"], f"{config['dataset']}.item")


def read_item_table(config):
    """The ``.item`` file as ``(fields, rows, where)`` (see :func:`read_atomic_table`), or None without one."""
    path = item_file(config)
    if not os.path.isfile(path):
        return None
    return read_atomic_table(path, config["ITEM_ID_FIELD"], config["field_separator"], config["seq_separator"])


def template_segments(template):
    """``template`` cut into ``(text, optional)`` segments: a part in ``[...]`` (outside ``{}``) is optional, left out
    of an item's text when a field it names is empty; ``[[`` and ``]]`` are literal brackets.

    Raises:
        FeatureError: an unbalanced or nested ``[...]``.
    """
    segments, current, optional, depth, i = [], [], False, 0, 0
    while i < len(template):
        char, pair = template[i], template[i : i + 2]
        if depth == 0 and pair in ("[[", "]]"):
            current.append(char)
            i += 2
            continue
        if char in "{}":
            depth += 1 if char == "{" else -1
        elif depth == 0 and char in "[]":
            if (char == "[") == optional:
                raise FeatureError(f"item_text_template {template!r}: unbalanced or nested '[...]' at character {i}")
            segments.append(("".join(current), optional))
            current, optional = [], char == "["
            i += 1
            continue
        current.append(char)
        i += 1
    if optional:
        raise FeatureError(f"item_text_template {template!r}: '[' without its ']'")
    segments.append(("".join(current), False))
    return [(text, optional) for text, optional in segments if text]


def format_item_texts(template, fields, rows, path, id_field):
    """``template`` filled with each row's fields, as ``(tokens, texts)``; an optional segment (``[...]``, see
    :func:`template_segments`) is left out where a field it names is empty.

    Raises:
        FeatureError: the template names a field the file does not have, or is malformed.
    """
    formatter = _TemplateFormatter()
    segments = []
    for text, optional in template_segments(template):
        try:
            names = {name.split(".")[0].split("[")[0] for _, name, _, _ in formatter.parse(text) if name is not None}
        except ValueError as err:
            raise FeatureError(f"item_text_template {template!r} is malformed ({err})") from None
        missing = sorted(names - set(fields))
        if missing or "" in names:
            raise FeatureError(
                f"item_text_template {template!r} names field(s) {missing or ['{}']} that {path} does not have; "
                f"its fields are {list(fields)}"
            )
        segments.append((text, names if optional else set()))

    def fill(row):
        kept = [text for text, needed in segments if all(row[name] not in ("", [], None) for name in needed)]
        return " ".join(formatter.format("".join(kept), **row).split())

    return [row[id_field] for row in rows], [fill(row) for row in rows]


def item_texts(config):
    """Item texts as ``(source, tokens, texts, where)``: from ``item_text_file`` when set, else from the
    ``.item`` file through the item text template.
    """
    id_field = config["ITEM_ID_FIELD"]
    text_file = setting(config, "item_text_file")
    if text_file is not None:
        text_file = os.path.abspath(text_file)
        tokens, texts, where = read_text_file(text_file, id_field, config["field_separator"], config["seq_separator"])
        return text_file, tokens, texts, where
    table = read_item_table(config)
    if table is None:
        raise FeatureError(
            f"no item text for dataset {config['dataset']!r}: {item_file(config)} does not exist; "
            f"add it or set item_text_file to a description file"
        )
    fields, rows, where = table
    template = item_text_template(config, fields)
    tokens, texts = format_item_texts(template, fields, rows, item_file(config), id_field)
    return f"{item_file(config)} | template {template!r}", tokens, texts, where


def item_titles_and_genres(config):
    """``(titles, genres)`` from the ``.item`` file: item token -> title (``item_title_field``) and -> list of
    genres (``item_genre_field``); empty where the file or the field is missing.
    """
    table = read_item_table(config)
    if table is None:
        return {}, {}
    fields, rows, _ = table
    id_field = config["ITEM_ID_FIELD"]
    columns = []
    for key in ("item_title_field", "item_genre_field"):
        field = setting(config, key)
        values = {row[id_field]: row[field] for row in rows} if field in fields else {}
        columns.append({token: value if isinstance(value, list) else [value] for token, value in values.items()})
    titles, genres = columns
    return {token: " ".join(words) for token, words in titles.items()}, genres
