"""A SuperNode's node worker: one long-lived process per SuperNode that holds its partition's node (rows, model,
item features) in memory and answers the ClientApp's requests, so a round costs the training, not a Python start,
the imports and the node's construction (Flower starts a ClientApp process per message).

    python -m recbole_ur4rec.apps.flower.worker --partition <root>/node-0 [--state-dir S] [--items I] [--socket P]
        [--min-users 5] [--secagg-only] [--max-evaluations 300] [--max-clip-norm C] [--min-noise-multiplier Z]
    flower-supernode ... --node-config 'partition="<root>/node-0" worker="<root>/node-0/state/worker.sock"'

The worker listens on a Unix socket (default ``<state-dir>/worker.sock``, only on this machine) and writes a fresh
random key beside it (``<socket>.key``, mode 0600), which a client must prove it knows (HMAC challenge) before it is
served. A request and its reply are a JSON header and an ``.npz`` of named arrays (read with ``allow_pickle=False``):
nothing is unpickled. Requests are served one at a time (the node's model is shared), by
:class:`~.node_service.NodeService`, which keeps the node of the current run and rebuilds it when the run's settings
or the partition's files change. Everything that must outlive the worker (local parameters) is on disk in the state
folder (owner-only, 0700), as without a worker.

The node's limits (:class:`~recbole_ur4rec.federated.privacy.NodePolicy`) are the worker's options: every caller,
this project's ClientApp or any other code on the machine that holds the key, gets only what they allow.

This module imports no torch and no RecBole until the worker starts: the ClientApp imports it to send requests.
"""
import argparse
import io
import json
import os
import secrets
import sys
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener

import numpy as np

from recbole_ur4rec.common.private_files import private_dir
from recbole_ur4rec.federated.privacy import NodePolicy

KEY_BYTES = 32


def default_socket(state_dir):
    return os.path.join(str(state_dir), "worker.sock")


def _key_path(address):
    return f"{address}.key"


def command(partition, state_dir, address=None, policy=None):
    """The command line that starts a node worker on ``partition`` (socket ``address``, default in ``state_dir``)
    with the node ``policy`` (settings of :class:`~recbole_ur4rec.federated.privacy.NodePolicy`, e.g.
    ``{"min-users": 3}``)."""
    address = address or default_socket(state_dir)
    options = []
    for key, value in NodePolicy.from_settings(policy, "node policy").as_settings().items():
        options += [f"--{key}"] if value is True else [] if value is False else [f"--{key}", str(value)]
    return [
        sys.executable, "-m", "recbole_ur4rec.apps.flower.worker", "--partition", str(partition), "--state-dir", str(state_dir),
        "--socket", str(address), *options,
    ]


def wait_listening(address, process, timeout, log_tail=lambda: ""):
    """Wait until the worker ``process`` listens at ``address`` (it writes the key file once its socket exists);
    RuntimeError, with ``log_tail()``, when it exits first or ``timeout`` seconds pass (it imports torch and RecBole
    first)."""
    deadline = time.time() + timeout
    while not os.path.exists(_key_path(address)):
        if time.time() > deadline or process.poll() is not None:
            raise RuntimeError(f"the node worker at {address} did not start: {log_tail()}")
        time.sleep(0.2)


def _pack(header, arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return [json.dumps(header).encode(), buffer.getvalue()]


def _unpack(head, body):
    with np.load(io.BytesIO(body), allow_pickle=False) as npz:
        return json.loads(head.decode()), {name: npz[name] for name in npz.files}


def call(address, header, arrays):
    """Send one request to the worker at ``address``; return its reply ``(header, arrays)``; a request the worker
    failed raises RuntimeError with the worker's error."""
    address = str(address)
    try:
        with open(_key_path(address), "rb") as f:
            key = f.read()
        connection = Client(address, family="AF_UNIX", authkey=key)
    except (OSError, EOFError, AuthenticationError) as error:
        raise ConnectionError(
            f"no node worker answers at {address} (node config 'worker'): start it on this machine with "
            f"`python -m recbole_ur4rec.apps.flower.worker --partition <this node's partition> --socket {address}` "
            f"({type(error).__name__}: {error})"
        ) from None
    with connection:
        for part in _pack(header, arrays):
            connection.send_bytes(part)
        reply, reply_arrays = _unpack(connection.recv_bytes(), connection.recv_bytes())
    if "error" in reply:
        raise RuntimeError(f"node worker {address}: {reply['error']}")
    return reply, reply_arrays


def serve(address, service):
    """Answer requests on the Unix socket ``address`` with ``service`` (a :class:`~.node_service.NodeService`),
    one at a time, until killed."""
    import traceback
    from logging import getLogger

    address = str(address)
    private_dir(os.path.dirname(os.path.abspath(address)))
    if os.path.exists(address):  # a previous worker's socket, unless a live worker still answers on it
        import socket

        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(address)
            except OSError:
                os.remove(address)
            else:
                raise RuntimeError(f"another node worker is listening on {address}: stop it first or give --socket another path")
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(_key_path(address) + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    with Listener(address, family="AF_UNIX", authkey=key) as listener:
        os.replace(_key_path(address) + ".tmp", _key_path(address))  # written once the socket exists: the ready signal
        while True:
            try:
                connection = listener.accept()
            except (OSError, EOFError, AuthenticationError) as error:  # a client that failed the challenge or hung up
                getLogger().warning(f"node worker {address}: refused a connection ({type(error).__name__}: {error})")
                continue
            with connection:
                try:
                    header, arrays = _unpack(connection.recv_bytes(), connection.recv_bytes())
                except (OSError, EOFError, ValueError) as error:
                    getLogger().warning(f"node worker {address}: malformed request ({type(error).__name__}: {error})")
                    continue
                begin = time.monotonic()
                try:
                    reply = service.handle(header, arrays)
                    print(f"{header.get('op')}: {time.monotonic() - begin:.2f} s", file=sys.stderr, flush=True)
                except Exception as error:  # the request fails, the worker goes on
                    getLogger().error(f"node worker {address}: {header.get('op')} failed\n{traceback.format_exc()}")
                    reply = ({"error": f"{type(error).__name__}: {error}"}, {})
                try:
                    for part in _pack(*reply):
                        connection.send_bytes(part)
                except OSError as error:  # the ClientApp went away (its message timed out)
                    getLogger().warning(f"node worker {address}: the reply was not delivered ({error})")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m recbole_ur4rec.apps.flower.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--partition", required=True, help="the node's partition folder (python -m recbole_ur4rec.apps.partition_dataset)")
    parser.add_argument("--state-dir", help="its users' local parameters (default <partition>/state)")
    parser.add_argument("--items", help="the shared item information (default: items beside the partition)")
    parser.add_argument("--socket", help="the Unix socket to listen on (default <state-dir>/worker.sock)")
    defaults = NodePolicy()
    parser.add_argument("--min-users", type=int, default=defaults.min_users, help="fewest users per training or evaluation reply (default %(default)s)")
    parser.add_argument("--secagg-only", action="store_true", help="refuse every training request outside SecAgg+")
    parser.add_argument("--max-evaluations", type=int, default=defaults.max_evaluations, help="evaluations answered per run (default %(default)s)")
    parser.add_argument("--max-clip-norm", type=float, help="the largest dp_clip_norm the server may ask for (default: any)")
    parser.add_argument("--min-noise-multiplier", type=float, default=defaults.min_noise_multiplier, help="the smallest dp_noise_multiplier the server may ask for (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        policy = NodePolicy.from_settings({key: getattr(args, key.replace("-", "_")) for key in NodePolicy.KEYS}, "worker options")
    except ValueError as error:
        parser.error(str(error))
    # lazy: ClientApps import this module to send requests, and must not pay for torch and RecBole
    from recbole_ur4rec.apps.flower.node_service import NodeService
    from recbole_ur4rec.federated.catalog import NodePartition

    NodePartition.read_meta(args.partition)  # a missing or foreign folder fails here, not at the first round
    service = NodeService(args.partition, args.state_dir, args.items, reuse=True, policy=policy)
    address = args.socket or default_socket(service.state_dir)
    print(f"node worker of {service.partition} listening on {address}", file=sys.stderr, flush=True)
    serve(address, service)


if __name__ == "__main__":
    main()
