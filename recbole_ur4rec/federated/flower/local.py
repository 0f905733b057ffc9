"""A loopback Flower runtime (a SuperLink and SuperNodes as local processes) for tests and benchmarks."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recbole_ur4rec.federated.flower.engine import APP_DIR


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 (free ports), each its own process, and ``flwr run``.

    Everything Flower writes goes to a temporary ``FLWR_HOME``; :meth:`close` (or leaving the ``with`` block) ends
    the processes it started and their children. ``cwd`` is the working directory of every process (RecBole's
    relative paths).
    """

    def __init__(self, num_nodes=2, cwd=None, startup_timeout=60.0, partition_root=None):
        self.num_nodes, self.cwd, self.startup_timeout = num_nodes, cwd, startup_timeout
        self.partition_root = partition_root
        self.processes, self.logs = [], []
        self.home = Path(tempfile.mkdtemp(prefix="ur4rec-flower-"))
        self.port = None
        self.bin = Path(sys.executable).parent
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

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
        self.processes.append(subprocess.Popen([str(self.bin / args[0]), *args[1:]], cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def start(self):
        self.port = _free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self._spawn("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"])
        deadline = time.time() + self.startup_timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.processes[0].poll() is not None:
                    raise RuntimeError(f"flower-superlink did not start: {self.log_tail('superlink')}") from None
                time.sleep(0.2)
        for i in range(self.num_nodes):
            self.start_node(i)

    def node_config(self, i):
        """Node ``i``'s ``--node-config``: its partition folder and a state folder of its own."""
        if self.partition_root is None:
            return f"partition-id={i} num-partitions={self.num_nodes}"
        partition = os.path.join(os.path.abspath(self.partition_root), f"node-{i}")
        return f'partition="{partition}" state-dir="{self.home / f"state-{i}"}"'

    def start_node(self, i):
        """Start SuperNode ``i`` (again, after :meth:`stop_node`: the same partition and state folder)."""
        self._spawn(f"supernode{i}", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
            "--port", str(_free_port()), "--node-config", self.node_config(i),
        ])

    def log_tail(self, name, chars=3000):
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _flwr(self, *args, timeout=120):
        done = subprocess.run([str(self.bin / "flwr"), *args], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done.stdout

    def run(self, run_config, timeout=900.0):
        """``flwr run`` the FedDMMR app with ``run_config`` (keys of flower_app/pyproject.toml); wait for it to end.

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
            if time.time() - checked > 5:  # a ServerApp that dies before writing its output
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
