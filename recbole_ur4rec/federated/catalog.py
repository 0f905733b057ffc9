"""Reading a partitioned federation (written by :mod:`recbole_ur4rec.apps.partition_dataset`) without interactions:
the server's :func:`federation_data` and :class:`FederationClients`, a node's :class:`NodePartition`, the shared item
information (:func:`read_items`) and the :class:`ItemCatalog` that stands in for RecBole's dataset when a model is
built. Files are JSON and ``.npz`` read with ``allow_pickle=False``: loading a partition runs no code."""
import json
import os

import numpy as np
import torch
from recbole.data.interaction import Interaction

FORMAT = "recbole-ur4rec-partition/1"
SPLITS = ("train", "valid", "test")


class PartitionError(ValueError):
    """A partition file that is missing, malformed, or does not fit the run."""


class ItemCatalog:
    """What a plugin model reads from a RecBole dataset when it is built, without any interaction.

    Args:
        config: the RecBole Config of the run.
        item_tokens (list): item tokens in id order (``[PAD]`` first).
        n_users (int): user ids (padding 0 included).
    """

    def __init__(self, config, item_tokens, n_users):
        self.config, self.dataset_name = config, config["dataset"]
        self.uid_field, self.iid_field = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
        self.item_num, self.user_num = len(item_tokens), int(n_users)
        self.field2id_token = {self.iid_field: np.asarray(item_tokens, dtype=object)}
        self.field2token_id = {self.iid_field: {token: i for i, token in enumerate(item_tokens)}}

    def num(self, field):
        if field == self.iid_field:
            return self.item_num
        if field == self.uid_field:
            return self.user_num
        raise KeyError(f"the item catalog of {self.dataset_name!r} has no field {field!r} (only {self.uid_field}, {self.iid_field})")


def _read_json(path, what):
    if not os.path.isfile(path):
        raise PartitionError(f"{path} is missing: {what}")
    with open(path) as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as error:
            raise PartitionError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        raise PartitionError(f"{path} is not a {FORMAT} file (its 'format' is {value.get('format') if isinstance(value, dict) else None!r})")
    return value


def read_items(items, dataset):
    """The shared item side information of a partition (``<items>/items.json``)."""
    value = _read_json(os.path.join(items, "items.json"), "the partition's shared item information")
    if value["dataset"] != dataset:
        raise PartitionError(f"{items}/items.json describes the items of dataset {value['dataset']!r}, the run is on {dataset!r}")
    return value


def read_federation(root):
    """The server's view of a partitioned dataset (``<root>/server/federation.json``)."""
    return _read_json(os.path.join(root, "server", "federation.json"), "write it with python -m recbole_ur4rec.apps.partition_dataset")


class NodePartition:
    """One node's rows: ``rows[split]`` is a RecBole Interaction of that split's rows of the node's users only.

    Args:
        folder (str): ``<root>/node-<k>``.
        dataset (str): the run's dataset name; the partition must be of it.
        n_items (int or None): the run's number of items (checked when given).
    """

    def __init__(self, folder, dataset, n_items=None):
        self.folder = folder
        meta = self.read_meta(folder)
        if meta["dataset"] != dataset:
            raise PartitionError(f"{folder} holds a partition of dataset {meta['dataset']!r}, the run is on {dataset!r}")
        if n_items is not None and meta["n_items"] != n_items:
            raise PartitionError(f"{folder} was written for {meta['n_items']} item ids, the run has {n_items}")
        self.meta, self.node, self.users = meta, int(meta["node"]), sorted(int(u) for u in meta["users"])
        path = os.path.join(folder, "partition.npz")
        if not os.path.isfile(path):
            raise PartitionError(f"{path} is missing")
        try:
            with np.load(path, allow_pickle=False) as arrays:
                columns = {key: torch.from_numpy(arrays[key]) for key in arrays.files}
        except ValueError as error:
            raise PartitionError(f"{path} is not a plain .npz of arrays ({error})") from None
        self.rows = {}
        for split in SPLITS:
            fields = {key.split(".", 1)[1]: value for key, value in columns.items() if key.startswith(f"{split}.")}
            if not fields:
                raise PartitionError(f"{path} holds no {split} rows")
            self.rows[split] = Interaction(fields)
        uid = meta["uid_field"]
        own = set(self.users)
        for split, rows in self.rows.items():
            strangers = sorted(set(rows[uid].tolist()) - own)
            if strangers:
                raise PartitionError(f"{path}: {split} rows of users {strangers[:5]} that node.json does not assign to this node")

    @staticmethod
    def read_meta(folder):
        """The partition's ``node.json`` (its node index, users, dataset and sizes)."""
        return _read_json(os.path.join(folder, "node.json"), "the node's partition (python -m recbole_ur4rec.apps.partition_dataset)")

    def check_users(self, users):
        """Raise when ``users`` are not this node's (a server that assigns a user to the wrong node)."""
        strangers = sorted(set(int(u) for u in users) - set(self.users))
        if strangers:
            raise PartitionError(
                f"node {self.node} ({self.folder}) does not hold users {strangers[:5]}{' ...' if len(strangers) > 5 else ''}: "
                "the server assigned them to the wrong node (check the federation's node ids and --node-config partition)"
            )


class FederationClients:
    """The clients a data-free server samples: ids (sorted), sample counts, training rows and nodes
    (``server/federation.json``)."""

    def __init__(self, federation):
        rows = sorted(federation["clients"])
        self.clients = np.asarray([c for c, _, _, _ in rows], dtype=np.int64)
        self.node_of = {c: node for c, node, _, _ in rows}
        self.counts = {c: count for c, _, count, _ in rows}
        self.n_rows = {c: n for c, _, _, n in rows}
        self.nodes = int(federation["nodes"])


class FederationTrainData:
    """What RecBole's ``fit`` and the federated trainer read of a training loader, on a server without data."""

    def __init__(self, federation, seed):
        self.federation = federation
        self.generator = torch.Generator().manual_seed(int(seed))  # the resume state saves it, as a loader's


class NodeSplit:
    """A split that only the nodes hold: the trainer evaluates it on them (``name``: ``valid`` or ``test``)."""

    def __init__(self, name):
        self.name = name

    def __bool__(self):
        return True

    def __repr__(self):
        return f"NodeSplit({self.name!r})"


def federation_data(config):
    """``(catalog, train_data, valid_data, test_data)`` of a data-free server run on the partition at config
    ``federation_dir``: the server reads ``server/federation.json`` and the shared item information only."""
    root = config["federation_dir"]
    federation = read_federation(root)
    if federation["dataset"] != config["dataset"]:
        raise PartitionError(f"{root} is a partition of dataset {federation['dataset']!r}, the run is on {config['dataset']!r}")
    items = os.path.join(root, "items")
    catalog = read_items(items, config["dataset"])
    if len(catalog["item_tokens"]) != federation["n_items"]:
        raise PartitionError(f"{items}/items.json lists {len(catalog['item_tokens'])} item ids, federation.json {federation['n_items']}")
    dataset = ItemCatalog(config, catalog["item_tokens"], 0)  # no user-side state on the server
    return dataset, FederationTrainData(federation, config["seed"]), NodeSplit("valid"), NodeSplit("test")
