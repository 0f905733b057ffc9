"""A loopback Flower runtime (a SuperLink and SuperNodes as local processes) for tests and benchmarks, with TLS and
SuperNode authentication (certificates and keys generated for it) or, for comparison, without (``--insecure``)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recbole_ur4rec.apps.flower import worker
from recbole_ur4rec.common.private_files import private_dir, write_private
from recbole_ur4rec.federated.privacy import TEST_HOOKS_ENV

APP_DIR = Path(__file__).parent / "app"  # the Flower App (pyproject.toml) that `flwr run` starts


def write_credentials(folder, num_nodes, host="127.0.0.1"):
    """A CA, the SuperLink's TLS certificate and key (signed by the CA, valid for ``host`` and localhost) and one
    authentication key pair per SuperNode (EC P-384, OpenSSH format, as ``flwr supernode register`` expects), in
    ``folder``: ``ca.crt``, ``server.pem``, ``server.key``, ``node<i>`` and ``node<i>.pub``; the folder and the
    private keys owner-only (0700, 0600)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(private_dir(folder))
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5), "not_valid_after": now + datetime.timedelta(days=30)}

    def certificate(subject, issuer, key, signer, extensions):
        builder = x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        builder = builder.serial_number(x509.random_serial_number()).not_valid_before(valid["not_valid_before"])
        builder = builder.not_valid_after(valid["not_valid_after"])
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "recbole-ur4rec federation CA")])
    ca = certificate(ca_name, ca_name, ca_key, ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if host not in ("127.0.0.1", "localhost"):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]), ca_name, server_key, ca_key,
        [(x509.SubjectAlternativeName(names), False), (x509.BasicConstraints(ca=False, path_length=None), True)],
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(server.public_bytes(pem))
    server_pem = server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private(folder / "server.key", lambda f: f.write(server_pem))
    for i in range(num_nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        node_pem = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        write_private(folder / f"node{i}", lambda f: f.write(node_pem))
        (folder / f"node{i}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return folder


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 (free ports), each its own process, and ``flwr run``.

    Everything Flower writes goes to a temporary ``FLWR_HOME``; :meth:`close` (or leaving the ``with`` block) ends
    the processes it started and their children. ``cwd`` is the working directory of every process (RecBole's
    relative paths). ``partition_root``: node ``i`` holds ``<partition_root>/node-<i>``. ``secure`` (default):
    TLS with a CA made for this federation and SuperNode authentication, each SuperNode's public key registered with
    ``flwr supernode register`` before it starts; False: ``--insecure``, for comparison. ``workers`` (default, with
    ``partition_root``): each SuperNode's node runs in a node worker of its own (:mod:`.worker`), started before the
    SuperNode; False: every ClientApp process builds its node. ``policy``: every node's limits (settings of
    :class:`~recbole_ur4rec.federated.privacy.NodePolicy`, e.g. ``{"min-users": 3}``), given to its worker or in its
    node config. Its processes obey the run config's test hooks (``RECBOLE_UR4REC_TEST_HOOKS=1``).
    """

    def __init__(self, num_nodes=2, cwd=None, startup_timeout=60.0, partition_root=None, secure=True, workers=True, policy=None):
        self.num_nodes, self.cwd, self.startup_timeout = num_nodes, cwd, startup_timeout
        self.partition_root, self.secure, self.policy = partition_root, secure, dict(policy or {})
        self.workers = workers and partition_root is not None
        self.processes, self.logs = [], []
        self.home = Path(tempfile.mkdtemp(prefix="ur4rec-flower-"))
        self.port = None
        self.bin = Path(sys.executable).parent
        self.env = {
            **os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            TEST_HOOKS_ENV: "1",
        }
        self.env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")  # a message waits for its ClientApp 0.1 s, not 0.5 s, on average
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"  # Flower starts flower-superexec by name
        self.certs = self.home / "certs"

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _spawn(self, name, args):
        log = open(self.home / f"{name}.log", "wb")
        self.logs.append(log)
        program = args[0] if os.path.isabs(args[0]) else str(self.bin / args[0])
        self.processes.append(subprocess.Popen([program, *args[1:]], cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def start(self):
        self.port = _free_port()
        if self.secure:
            write_credentials(self.certs, self.num_nodes)
            connection, tls = f'root-certificates = "{self.certs / "ca.crt"}"', [
                "--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth",
            ]
        else:
            connection, tls = "insecure = true", ["--insecure"]
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n{connection}\n'
        )
        self._spawn("superlink", ["flower-superlink", *tls, "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"])
        deadline = time.time() + self.startup_timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.processes[0].poll() is not None:
                    raise RuntimeError(f"flower-superlink did not start: {self.log_tail('superlink')}") from None
                time.sleep(0.2)
        workers = [self.start_worker(i) for i in range(self.num_nodes)] if self.workers else []
        for i in range(self.num_nodes):
            if self.secure:
                self._flwr("supernode", "register", str(self.certs / f"node{i}.pub"), "local")
        for i, process in enumerate(workers):
            self.wait_worker(i, process)
        for i in range(self.num_nodes):
            self.start_node(i)

    def _partition(self, i):
        return os.path.join(os.path.abspath(self.partition_root), f"node-{i}")

    def _state_dir(self, i):
        return self.home / f"state-{i}"

    def worker_socket(self, i):
        return worker.default_socket(self._state_dir(i))

    def start_worker(self, i, name=None):
        """Start node ``i``'s worker (:mod:`.worker`) on its partition and state folder; returns its process."""
        self._spawn(name or f"worker{i}", worker.command(self._partition(i), self._state_dir(i), self.worker_socket(i), self.policy))
        return self.processes[-1]

    def wait_worker(self, i, process):
        worker.wait_listening(self.worker_socket(i), process, max(self.startup_timeout, 180.0), lambda: self.log_tail(f"worker{i}"))

    def node_config(self, i):
        """Node ``i``'s ``--node-config``: its partition folder, a state folder of its own and its worker's socket."""
        if self.partition_root is None:
            return f"partition-id={i} num-partitions={self.num_nodes}"
        config = f'partition="{self._partition(i)}" state-dir="{self._state_dir(i)}"'
        if self.workers:
            return config + f' worker="{self.worker_socket(i)}"'
        return " ".join([config] + [f"{key}={json.dumps(value)}" for key, value in self.policy.items()])

    def start_node(self, i, key=True, name=None):
        """Start SuperNode ``i`` (its partition and state folder); with TLS, authenticated by its registered key
        (``key=False``: no key, which an authenticating SuperLink refuses). Returns its process."""
        if self.secure:
            auth = ["--root-certificates", str(self.certs / "ca.crt")]
            auth += ["--auth-supernode-private-key", str(self.certs / f"node{i}")] if key else []
        else:
            auth = ["--insecure"]
        self._spawn(name or f"supernode{i}", [
            "flower-supernode", *auth, "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
            "--port", str(_free_port()), "--node-config", self.node_config(i),
        ])
        return self.processes[-1]

    def log_tail(self, name, chars=3000):
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _flwr(self, *args, timeout=120):
        done = subprocess.run([str(self.bin / "flwr"), *args], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done.stdout

    def run(self, run_config, timeout=900.0):
        """``flwr run`` the FedDMMR app with ``run_config`` (keys of apps/flower/app/pyproject.toml); wait for it to end.

        Returns:
            dict: ``result`` (of ``run_recbole_ur4rec``) and ``rounds`` (one record per round) of the ServerApp.
        """
        import tomli_w

        output = self.home / f"output-{time.time_ns()}.json"
        overrides = self.home / f"run-config-{time.time_ns()}.toml"
        overrides.write_text(tomli_w.dumps({"min-nodes": self.num_nodes, **run_config, "output": str(output)}))
        started = json.loads(self._flwr("run", str(APP_DIR), "local", "--run-config", str(overrides), "--format", "json"))
        run_id = started["run-id"]
        deadline, checked = time.time() + timeout, time.time()
        while not output.exists():
            if time.time() > deadline:
                raise TimeoutError(f"Flower run {run_id} did not finish within {timeout} s:\n{self.run_log(run_id)}")
            if time.time() - checked > 30:  # a ServerApp that died before writing its output (each `flwr ls` is a
                # Python process: ~1.5 s of CPU, which a tighter poll takes from the run it watches)
                checked = time.time()
                status = json.loads(self._flwr("ls", "local", "--run-id", str(run_id), "--format", "json"))
                if any(str(r.get("status", "")).startswith("finished") for r in status.get("runs", [])) and not output.exists():
                    time.sleep(1)
                    if not output.exists():
                        raise RuntimeError(f"Flower run {run_id} ended without output:\n{self.run_log(run_id)}")
            time.sleep(0.2)
        value = json.loads(output.read_text())
        if "error" in value:
            raise RuntimeError(f"the ServerApp of Flower run {run_id} failed:\n{value['error']}")
        return value

    def run_log(self, run_id):
        try:
            return self._flwr("log", str(run_id), "local", "--show", timeout=30)[-6000:]
        except Exception as error:  # the log is for the error message only
            return f"(no log: {error})"

    def close(self):
        """End the started processes and their children (Flower's SuperExec and app processes)."""
        import psutil

        family = []  # psutil handles: kill() refuses a pid that was reused meanwhile
        for process in self.processes:
            try:
                family += psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for child in family:  # children a terminated parent left behind
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.processes = []
        for log in self.logs:
            log.close()
        self.logs = []
        shutil.rmtree(self.home, ignore_errors=True)
