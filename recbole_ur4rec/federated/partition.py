"""Per-node datasets for federated deployments: each node holds only its users' rows; the server holds none.

    python -m recbole_ur4rec.federated.partition --dataset ml-100k --nodes 2 --out fed/ml-100k [--key=value ...]

RecBole loads, filters, remaps and splits the dataset once, as for any run (time-ordered leave-one-out; the
cold-item protocol when ``cold_items`` is on), and the command writes:

- ``node-<k>/partition.npz``: node ``k``'s users only (user ``u`` goes to node ``u % nodes``): their whole-sequence
  training rows and their validation and test rows (one per user), every column as RecBole built it; and
  ``node-<k>/node.json`` (its users, the dataset, the number of items);
- ``server/federation.json``: what the server reads instead of interactions: the number of items and user ids,
  and per client (user id) its node, sample count (training interactions) and number of training rows (for the
  round plans);
- ``items/items.json`` (the item tokens in id order) and ``items/<dataset>/`` (the ``.item`` file and the item
  feature caches, text and images, that the model reads): the item side information every process shares.

Files are ``.npz`` (read with ``allow_pickle=False``) and JSON: loading a partition runs no code. The server
(:func:`server_catalog`) and a node (:class:`NodePartition`) rebuild the model from an :class:`ItemCatalog`, which
stands in for RecBole's dataset at model construction (item and user counts, item tokens), without interactions.
"""
import argparse
import glob
import json
import os
import shutil
import sys

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
    return _read_json(os.path.join(root, "server", "federation.json"), "write it with python -m recbole_ur4rec.federated.partition")


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
        return _read_json(os.path.join(folder, "node.json"), "the node's partition (python -m recbole_ur4rec.federated.partition)")

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


def _columns(dataset, mask):
    return {field: dataset.inter_feat[field][mask].numpy() for field in dataset.inter_feat.columns}


def write_partitions(run, out, nodes):
    """Write the partitions of ``run`` (a :func:`recbole_ur4rec.build.build` result) for ``nodes`` nodes to ``out``.

    Returns:
        dict: the server's federation file content.
    """
    from recbole_ur4rec.data.sequence_dataset import target_list_field
    from recbole_ur4rec.federated.engine import ClientData
    from recbole_ur4rec.features.settings import cache_dir

    config, dataset = run.config, run.dataset
    if nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {nodes}")
    uid, name = config["USER_ID_FIELD"], config["dataset"]
    splits = {"train": run.train_data._dataset, "valid": run.valid_data._dataset, "test": run.test_data._dataset}
    clients = ClientData(splits["train"], target_list_field(config))
    n_items = dataset.item_num
    os.makedirs(out, exist_ok=True)
    for node in range(nodes):
        folder = os.path.join(out, f"node-{node}")
        os.makedirs(folder, exist_ok=True)
        users = sorted(int(u) for u in clients.clients if int(u) % nodes == node)
        arrays = {}
        for split, data in splits.items():
            mask = torch.as_tensor(np.isin(data.inter_feat[uid].numpy(), users))
            arrays.update({f"{split}.{field}": value for field, value in _columns(data, mask).items()})
        np.savez(os.path.join(folder, "partition.npz"), **arrays)
        meta = {
            "format": FORMAT, "dataset": name, "node": node, "nodes": nodes, "users": users, "n_items": n_items,
            "n_users": dataset.user_num, "uid_field": uid,
        }
        _write_json(os.path.join(folder, "node.json"), meta)
    # item side information: the .item file and the item feature caches
    items = os.path.join(out, "items", name)
    os.makedirs(items, exist_ok=True)
    source = os.path.join(config["data_path"], f"{name}.item")
    if os.path.isfile(source):
        shutil.copy(source, items)
    for path in glob.glob(os.path.join(cache_dir(config), f"{name}.item_*")):
        shutil.copy(path, items)
    item_tokens = [str(t) for t in dataset.field2id_token[config["ITEM_ID_FIELD"]]]
    _write_json(os.path.join(out, "items", "items.json"), {"format": FORMAT, "dataset": name, "item_tokens": item_tokens})
    federation = {
        "format": FORMAT,
        "dataset": name,
        "nodes": nodes,
        "n_items": n_items,
        "n_users": dataset.user_num,
        "clients": [[int(c), int(c) % nodes, clients.counts[int(c)], len(clients.rows[int(c)])] for c in clients.clients],
        "cold_items": bool(config["cold_items"]),
    }
    os.makedirs(os.path.join(out, "server"), exist_ok=True)
    _write_json(os.path.join(out, "server", "federation.json"), federation)
    return federation


def _write_json(path, value):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m recbole_ur4rec.federated.partition", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", "-d", required=True, help="RecBole dataset name")
    parser.add_argument("--model", "-m", default="FedDMMR", help="model whose settings build the rows (default FedDMMR)")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config_files", default=None, help="config files, separated by spaces")
    from recbole_ur4rec.cli import parse_overrides

    args, unknown = parser.parse_known_args(argv)
    return args, parse_overrides(parser, unknown)


def main(argv=None):
    from recbole_ur4rec.build import build
    from recbole_ur4rec.cli import isolated_argv

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    with isolated_argv():
        run = build(args.model, args.dataset, args.config_files.split() if args.config_files else None, overrides, log=False)
    federation = write_partitions(run, args.out, args.nodes)
    per_node = np.bincount([node for _, node, _, _ in federation["clients"]], minlength=args.nodes)
    print(f"{args.out}: {len(federation['clients'])} clients on {args.nodes} nodes ({', '.join(map(str, per_node))}); "
          f"{federation['n_items'] - 1} items")


if __name__ == "__main__":
    main()
