"""FedDMMR's federated rounds on Flower's deployment runtime: partitions on SuperNodes, separate processes or machines.

The applications: :mod:`.server_app` (the ServerApp: the whole RecBole run, on a partitioned dataset's ``server/``
and ``items/`` only), :mod:`.client_app` (the ClientApp on every SuperNode: one partition's
:class:`~recbole_ur4rec.federated.node.Node`, served by :mod:`.node_service` in the ClientApp's process or in the
SuperNode's long-lived node worker, :mod:`.worker`) and :mod:`.loopback` (:class:`LocalFederation`, a loopback runtime
with TLS and SuperNode authentication for tests and benchmarks); ``app/`` is the Flower App that ``flwr run`` starts.
The server's side of a round and of an evaluation (:class:`~recbole_ur4rec.federated.flower_nodes.FlowerNodes`, the
:class:`~recbole_ur4rec.federated.flower_nodes.FlowerSession` it runs in) and SecAgg+ rounds
(:mod:`recbole_ur4rec.federated.secagg`) are part of the federated core that the trainer uses. Importing this package
imports no Flower module.

``federated_engine: flower`` with ``federation_dir`` (a partition written by ``python -m
recbole_ur4rec.apps.partition_dataset``) makes the RecBole run inside the ServerApp the server of the federation:

- the server asks each connected SuperNode which partition it holds (a ``query`` message; node config
  ``partition``), then each round sends every partition with sampled users one ``train.plain`` message: the
  global parameters (ArrayRecord), the users' ids, row counts and row orders of the round (from
  :func:`~recbole_ur4rec.federated.round_plan`), the local training settings, and the server's copy of the local
  parameters when ``local_groups`` are kept on the clients (what a user starts from);
- the node trains its users (the loop engine's update), keeps their new local parameters in its state folder and
  replies one partial aggregate (:meth:`~recbole_ur4rec.federated.FedAvg.partial`: the weighted sum of its clients'
  clipped updates, with its DP noise under DP, their total weight, how many clients were included or failed, their
  loss sum), within its limits (:class:`~recbole_ur4rec.federated.privacy.NodePolicy`); with run config ``secagg``
  the same travels masked inside SecAgg+ (plain ``train`` messages, :mod:`recbole_ur4rec.federated.secagg`);
- validation and test are ``evaluate`` messages: each node ranks its users' rows with the global parameters and
  each user's local parameters and replies metric sums and counts (:func:`~recbole_ur4rec.federated.node.metric_sums`).

A node that fails, refuses, or does not reply within ``round-timeout`` seconds, and a partial that is not finite or
out of range, are logged and the node's clients left out (an evaluation needs every partition). Relative paths in the settings resolve against each process's working
directory. See the README ("Federated deployment") for the commands with TLS and SuperNode authentication.
"""
