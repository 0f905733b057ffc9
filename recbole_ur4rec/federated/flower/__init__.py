"""FedDMMR's federated rounds on Flower's deployment runtime: clients on SuperNodes, separate processes or machines.

Modules: :mod:`.engine` (:class:`FlowerEngine`, the trainer's side of a round, and the :class:`FlowerSession` it runs
in), :mod:`.server_app` (the ServerApp: the whole RecBole run), :mod:`.client_app` (the ClientApp on every SuperNode)
and :mod:`.local` (:class:`LocalFederation`, a loopback runtime for tests and benchmarks). Importing this package
imports no Flower module.

``federated_engine: flower`` makes :class:`FlowerEngine` run the client updates of each round. The whole RecBole run
(:func:`~recbole_ur4rec.quick_start.run_recbole_ur4rec`: data, ``fit``, aggregation, evaluation) is the main of a
Flower ``ServerApp``; the ``ClientApp`` on every SuperNode trains the users assigned to that node:

- the server sorts the connected SuperNodes and gives user ``u`` to node ``u % n_nodes``; each round it sends every
  node with sampled users one ``train`` Message: the global parameters (ArrayRecord), the node's users, their row
  orders of the round (from :func:`~recbole_ur4rec.federated.round_plan`), the local optimizer, learning rate and
  batch size, and the RecBole settings the node rebuilds the same dataset and model from (its users' rows are read
  on the node; raw interactions never travel);
- the ClientApp runs :class:`~recbole_ur4rec.federated.LoopEngine`'s client update for each of its users (the same
  local optimizer steps) and replies per-client deltas, sample counts and losses, plus the users' new local parameters
  (``local_groups`` after the warm-up): the in-process engines hand those to the trainer too, which keeps them in the
  model's ``local__*`` buffers for personalised evaluation and checkpoints. The node also keeps them in its node state
  between rounds, so the server sends a user's local parameters only when that node does not hold the current copy
  (the first local round, after a resume, or when the user moved to another node);
- the server adds the updates to the round's :class:`~recbole_ur4rec.federated.FedAvg` client by client in the
  sampled order, as :class:`~recbole_ur4rec.federated.LoopEngine` does, so the aggregate equals the in-process one
  up to float rounding (exactly with the same ``threads``) when the model has no dropout (with dropout each process
  draws its own masks). A client whose update fails on its node, and every client of a node that fails or does not
  reply within ``round-timeout`` seconds, is logged and left out (``FedAvg.fail``); the round completes.

Run it (all on 127.0.0.1 here; for nodes on other machines start the SuperLink with ``--host 0.0.0.0``)::

    flower-superlink --insecure --port 9091 --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:9091 --port 9094   # one per node, each its own --port
    flwr run recbole_ur4rec/federated/flower_app local --run-config run.toml

with ``local`` a connection of ``$FLWR_HOME/config.toml`` (``[superlink] default = "local"``, ``[superlink.local]``
``address = "127.0.0.1:9091"``, ``insecure = true``) and ``run.toml`` overriding the run config of
``flower_app/pyproject.toml`` (documented there), e.g. ``dataset = "ml-100k"``, ``config-json = '{"threads": 1}'``.
The apps are the installed recbole-ur4rec's (hence ``--disable-runtime-dependency-installation``: nothing is
installed per run). Relative RecBole paths resolve against the SuperLink's working directory (server) and the
SuperNodes' (nodes); ``--node-config 'data-path="..."'`` overrides ``data_path`` on a node. Every round starts one
ClientApp process per node, which rebuilds the dataset and model. :class:`LocalFederation` starts such a runtime on
loopback for tests and benchmarks (``bench/flower_round_time.py``).
"""
