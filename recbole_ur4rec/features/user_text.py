"""User preference text from the training split only: favourite genres with their shares, the most recent
titles and rating habits. Validation and test interactions never reach it: it reads only the dataset it is
given, which must be the training split (``train_data._dataset``, or the first dataset of ``dataset.build()``).
"""

from collections import Counter

import numpy as np
import pandas as pd

from recbole_ur4rec.features.errors import FeatureError


def training_history(dataset):
    """The interactions of ``dataset`` as a DataFrame (user, item, rating, time ids/values), oldest first.

    A sequential training split holds one row per target with the history before it (``item_id_list``);
    its interactions are every row's target plus each user's first item, which only appears in a history.

    Raises:
        FeatureError: the rows are item lists without their time field, as in a whole-sequence copy of the split
            (``loss_position: all``), whose rows this reconstruction would misread; pass RecBole's split instead.
    """
    feat = dataset.inter_feat
    length_field = dataset.config["ITEM_LIST_LENGTH_FIELD"]
    if length_field in feat and (dataset.time_field is None or dataset.time_field not in feat):
        raise FeatureError(
            f"user text needs RecBole's training split of {dataset.dataset_name!r} (one row per interaction, or "
            f"SequentialDataset's one row per prefix with its {dataset.time_field!r} field); got rows of item lists "
            f"without it (fields {list(feat.columns)}), e.g. whole-sequence rows: pass the split they were built from"
        )
    uid, iid = dataset.uid_field, dataset.iid_field
    columns = {"user": uid, "item": iid, "rating": dataset.config["RATING_FIELD"], "time": dataset.time_field}
    columns = {name: field for name, field in columns.items() if field is not None and field in feat}
    frame = pd.DataFrame({name: feat[field].numpy() for name, field in columns.items()})
    suffix = dataset.config["LIST_SUFFIX"]
    if length_field in feat and iid + suffix in feat:
        first = (feat[length_field] == 1).numpy()
        firsts = {name: frame[name].to_numpy()[first] for name in frame}
        firsts.update(
            {name: feat[field + suffix][:, 0].numpy()[first] for name, field in columns.items() if name != "user"}
        )
        frame = pd.concat([pd.DataFrame(firsts), frame], ignore_index=True)
    order = ["user", "time"] if "time" in frame else ["user"]
    return frame.sort_values(order, kind="stable").reset_index(drop=True)


def _share_text(counter, total, top):
    return ", ".join(f"{name} ({100 * count / total:.0f}%)" for name, count in counter.most_common(top))


def user_texts(dataset, titles, genres, top_genres, recent_items):
    """Preference text of every user with training interactions in ``dataset``, as ``(tokens, texts)``.

    Args:
        dataset: the training split.
        titles (dict): item token -> title; items without one are named by their token.
        genres (dict): item token -> list of genres; empty leaves the genre part out.
        top_genres (int): genres listed; recent_items (int): most recent titles listed.
    """
    history = training_history(dataset)
    item_tokens = dataset.field2id_token[dataset.iid_field]
    user_tokens = dataset.field2id_token[dataset.uid_field]
    ratings = history["rating"] if "rating" in history else None
    if ratings is not None:
        low, high = float(ratings.min()), float(ratings.max())
    tokens, texts = [], []
    for user, rows in history.groupby("user", sort=True):
        items = [str(item_tokens[i]) for i in rows["item"]]
        parts = []
        counter = Counter(genre for item in items for genre in genres.get(item, ()))
        if counter and top_genres:
            parts.append(f"Favourite genres: {_share_text(counter, len(items), top_genres)}.")
        if recent_items:
            recent = [titles.get(item, item) for item in reversed(items[-recent_items:])]
            parts.append(f"Recent items: {'; '.join(recent)}.")
        if ratings is not None:
            values = rows["rating"].to_numpy()
            quarter = (high - low) / 4
            high_share, low_share = np.mean(values >= high - quarter), np.mean(values <= low + quarter)
            parts.append(
                f"Rating habits: {len(values)} ratings, average {values.mean():.2f} on a {low:g}-{high:g} scale, "
                f"{100 * high_share:.0f}% high, {100 * low_share:.0f}% low."
            )
        else:
            parts.append(f"{len(items)} interactions, no ratings.")
        tokens.append(str(user_tokens[user]))
        texts.append(" ".join(parts))
    return tokens, texts
