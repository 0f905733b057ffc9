"""Per-node datasets for federated deployments: each node holds only its users' rows; the server holds none.

    python -m recbole_ur4rec.apps.partition_dataset --dataset ml-100k --nodes 2 --out fed/ml-100k [--key=value ...]

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
(:func:`~recbole_ur4rec.federated.catalog.federation_data`) and a node
(:class:`~recbole_ur4rec.federated.catalog.NodePartition`) rebuild the model from an
:class:`~recbole_ur4rec.federated.catalog.ItemCatalog`, without interactions.
"""
import argparse
import glob
import json
import os
import shutil
import sys

import numpy as np
import torch

from recbole_ur4rec.build import build
from recbole_ur4rec.common.argv import isolated_argv, parse_overrides
from recbole_ur4rec.common.private_files import private_dir, write_private
from recbole_ur4rec.common.tables import write_json
from recbole_ur4rec.data.sequence_dataset import target_list_field
from recbole_ur4rec.features.settings import cache_dir
from recbole_ur4rec.federated.catalog import FORMAT
from recbole_ur4rec.federated.local_engines import ClientData


def _columns(dataset, mask):
    return {field: dataset.inter_feat[field][mask].numpy() for field in dataset.inter_feat.columns}


def write_partitions(run, out, nodes):
    """Write the partitions of ``run`` (a :func:`recbole_ur4rec.build.build` result) for ``nodes`` nodes to ``out``.

    Returns:
        dict: the server's federation file content.
    """

    config, dataset = run.config, run.dataset
    if nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {nodes}")
    uid, name = config["USER_ID_FIELD"], config["dataset"]
    splits = {"train": run.train_data._dataset, "valid": run.valid_data._dataset, "test": run.test_data._dataset}
    clients = ClientData(splits["train"], target_list_field(config))
    n_items = dataset.item_num
    os.makedirs(out, exist_ok=True)
    for node in range(nodes):
        folder = private_dir(os.path.join(out, f"node-{node}"))  # a node's users' rows: owner-only
        users = sorted(int(u) for u in clients.clients if int(u) % nodes == node)
        arrays = {}
        for split, data in splits.items():
            mask = torch.as_tensor(np.isin(data.inter_feat[uid].numpy(), users))
            arrays.update({f"{split}.{field}": value for field, value in _columns(data, mask).items()})
        write_private(os.path.join(folder, "partition.npz"), lambda f: np.savez(f, **arrays))
        meta = {
            "format": FORMAT, "dataset": name, "node": node, "nodes": nodes, "users": users, "n_items": n_items,
            "n_users": dataset.user_num, "uid_field": uid,
        }
        write_private(os.path.join(folder, "node.json"), lambda f: f.write(json.dumps(meta).encode()))
    # item side information: the .item file and the item feature caches
    items = os.path.join(out, "items", name)
    os.makedirs(items, exist_ok=True)
    source = os.path.join(config["data_path"], f"{name}.item")
    if os.path.isfile(source):
        shutil.copy(source, items)
    for path in glob.glob(os.path.join(cache_dir(config), f"{name}.item_*")):
        shutil.copy(path, items)
    item_tokens = [str(t) for t in dataset.field2id_token[config["ITEM_ID_FIELD"]]]
    write_json(os.path.join(out, "items", "items.json"), {"format": FORMAT, "dataset": name, "item_tokens": item_tokens}, indent=None)
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
    write_json(os.path.join(out, "server", "federation.json"), federation, indent=None)
    return federation


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m recbole_ur4rec.apps.partition_dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", "-d", required=True, help="RecBole dataset name")
    parser.add_argument("--model", "-m", default="FedDMMR", help="model whose settings build the rows (default FedDMMR)")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config_files", default=None, help="config files, separated by spaces")

    args, unknown = parser.parse_known_args(argv)
    return args, parse_overrides(parser, unknown)


def main(argv=None):
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    with isolated_argv():
        run = build(args.model, args.dataset, args.config_files.split() if args.config_files else None, overrides, log=False)
    federation = write_partitions(run, args.out, args.nodes)
    per_node = np.bincount([node for _, node, _, _ in federation["clients"]], minlength=args.nodes)
    print(f"{args.out}: {len(federation['clients'])} clients on {args.nodes} nodes ({', '.join(map(str, per_node))}); "
          f"{federation['n_items'] - 1} items")


if __name__ == "__main__":
    main()
