"""FedAvg weighted by sample counts, with the client-failure rule, optional clipping, and the sum a node (or the
in-process trainer, the only node then) releases under user-level differential privacy.

The aggregator sees only parameter updates (``delta_k = theta_k - theta``) and sample counts ``n_k``; no client data.

    theta' = theta + sum_k w_k * c_k * delta_k / W
    c_k    = min(1, dp_clip_norm / ||delta_k||_2)   (1 without clipping; the norm is over all aggregated parameters)
    w_k    = n_k, W = sum_k w_k                      (without DP)
    w_k    = 1,   W = the round's sampled users       (DP, ``uniform``: W is public; see :mod:`.privacy`)

Under DP each node adds its noise to its sum (:meth:`FedAvg.add_noise`) before the sum leaves it. A client whose
update holds a NaN or an infinity is left out; under DP it adds a zero update and counts as included instead, so
that whether a user's update was finite (which a server could provoke with parameters chosen to overflow on some
users' data) does not reach the server. The server drops a node's partial that is not finite or larger than the node
could send (:func:`partial_problem`) as a failed node.
"""
import math
from logging import getLogger

import torch

from recbole_ur4rec.federated.privacy import node_noise, secure_generator


class FedAvg:
    """Accumulates client updates of one round; :meth:`result` gives the new global parameters.

    Args:
        global_params (dict): name -> tensor (the aggregated parameters only).
        clip_norm (float or None): clip every client's update to this L2 norm.
        uniform (bool): weight every client 1 and count a non-finite update as a zero one (DP).
    """

    def __init__(self, global_params, clip_norm=None, uniform=False):
        self.global_params = global_params
        self.clip_norm, self.uniform = clip_norm, uniform
        self.sums = {name: torch.zeros_like(p) for name, p in global_params.items()}
        self.total = 0.0
        self.included, self.excluded = [], []  # the clients known by id (in this process, or a whole failed node)
        self.n_included, self.n_excluded = 0, 0  # all clients, those of node replies (counts only) included

    def add(self, clients, deltas, counts):
        """Add the updates of ``clients`` (a list): ``deltas`` name -> [C ..], ``counts`` [C] sample counts.

        Returns:
            list: the clients left out because their update is not finite (none when ``uniform``).
        """
        counts = torch.as_tensor(counts, dtype=torch.float64)
        flat = [deltas[name].reshape(len(clients), -1) for name in self.global_params]
        finite = torch.stack([f.isfinite().all(1) for f in flat]).all(0) if flat else torch.ones(len(clients), dtype=torch.bool)
        scale = torch.ones(len(clients), dtype=torch.float64)
        if self.clip_norm is not None and flat:
            norms = torch.sqrt(sum(f.double().nan_to_num(0.0, 0.0, 0.0).pow(2).sum(1) for f in flat))  # [C]
            scale = torch.clamp(self.clip_norm / norms.clamp(min=1e-12), max=1.0)
        base = torch.ones_like(counts) if self.uniform else counts
        weights = torch.where(finite, base * scale, torch.zeros_like(counts))  # [C]
        for name in self.global_params:
            delta = torch.where(finite.view(-1, *[1] * (deltas[name].dim() - 1)), deltas[name], torch.zeros_like(deltas[name]))
            self.sums[name] += torch.tensordot(weights.to(delta.dtype), delta, dims=1)
        counted = torch.ones_like(finite) if self.uniform else finite
        left_out = [c for c, ok in zip(clients, counted.tolist()) if not ok]
        for client, ok in zip(clients, finite.tolist()):
            if not ok:
                getLogger().warning(f"client {client}: non-finite update, " + ("added as a zero update (DP)" if self.uniform else "left out of this round's aggregate"))
        self.included += [c for c, ok in zip(clients, counted.tolist()) if ok]
        self.excluded += left_out
        self.n_included += int(counted.sum())
        self.n_excluded += len(left_out)
        self.total += float(base[counted].sum())
        return left_out

    def fail(self, client, error):
        """Leave out a client whose update raised ``error``."""
        getLogger().warning(f"client {client}: update failed ({type(error).__name__}: {error}), left out of this round's aggregate")
        self.excluded.append(client)
        self.n_excluded += 1

    def add_noise(self, std, rng=None):
        """Add ``N(0, std^2)`` to every coordinate of the sums, from a secure generator (:mod:`.privacy`)."""
        rng = rng or secure_generator()
        for name, noise in node_noise({n: v.shape for n, v in self.sums.items()}, std, rng).items():
            self.sums[name] += torch.from_numpy(noise).to(self.sums[name].dtype)

    def partial(self):
        """The running sums (a node's share of the round), for :meth:`merge` on the server: the server learns the
        node's weighted sum of its clients' updates and how many were included or left out, not which."""
        return {
            "sums": {name: value.clone() for name, value in self.sums.items()}, "total": self.total,
            "included": self.n_included, "excluded": self.n_excluded,
        }

    def merge(self, partial):
        """Add another aggregator's :meth:`partial` (clipping, and noise, were applied there)."""
        for name, value in self.sums.items():
            value += partial["sums"][name].to(value.dtype)
        self.total += float(partial["total"])
        self.n_included += int(partial["included"])
        self.n_excluded += int(partial["excluded"])

    def result(self, denominator=None):
        """The new global parameters: the sums over ``denominator`` (DP: the round's sampled users, public) or over
        the total weight; unchanged when no client contributed."""
        if self.total == 0:
            getLogger().warning("no client contributed to this round: the global model is unchanged")
            return {name: p.clone() for name, p in self.global_params.items()}
        divide = float(denominator) if denominator else self.total
        return {name: p + self.sums[name] / divide for name, p in self.global_params.items()}


def partial_problem(partial, global_params, max_total, max_norm=None):
    """Why the server must drop a node's ``partial`` (:meth:`FedAvg.partial`), or None when it is fine: sums that
    do not match the parameters or are not finite, a total weight outside [0, ``max_total``] (what the node's
    sampled users can weigh), a norm above ``max_norm`` (clipping and noise bound it; None: unbounded)."""
    sums = partial["sums"]
    if set(sums) != set(global_params) or any(tuple(sums[n].shape) != tuple(global_params[n].shape) for n in sums):
        return "its sums do not match the global parameters"
    if not all(bool(v.isfinite().all()) for v in sums.values()):
        return "its sums are not finite"
    total = float(partial["total"])
    if not math.isfinite(total) or total < 0 or total > max_total * (1 + 1e-6) + 1e-6:
        return f"its total weight {total} is outside [0, {max_total}] (its sampled users' weight)"
    if max_norm is not None:
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in sums.values()))
        if norm > max_norm:
            return f"the norm of its sums, {norm:.4g}, exceeds {max_norm:.4g} (what clipping and noise allow)"
    return None


def partial_norm_bound(total, clip_norm, noise_std, size):
    """The largest norm an honest partial of weight ``total`` reaches: ``total * C`` (weights times clipped norms)
    plus its noise's norm (``size`` coordinates), which exceeds ``std * (sqrt(size) + 10)`` with probability below
    ``exp(-50)``; None without clipping."""
    if clip_norm is None:
        return None
    return total * clip_norm * (1 + 1e-5) + (noise_std * (math.sqrt(size) + 10) if noise_std else 0.0)


SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")


class ServerOptimizer:
    r"""Applies a round's aggregate to the global parameters; its state lives across rounds.

    With ``delta = FedAvg result - theta`` (the sample-weighted mean client update):

    - ``fedavg``: ``theta + lr * delta`` (plain FedAvg at ``lr`` 1);
    - ``fedavgm``: ``v = momentum * v + delta``; ``theta + lr * v`` (server momentum, Hsu et al., 2019);
    - ``fedadam``: ``m = momentum * m + (1 - momentum) * delta``, ``v = 0.99 * v + 0.01 * delta^2``;
      ``theta + lr * m / (sqrt(v) + tau)`` (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).
    """

    def __init__(self, kind="fedavg", lr=1.0, momentum=0.9, tau=1e-3):
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"config key 'server_optimizer' must be one of {', '.join(SERVER_OPTIMIZERS)}, got {kind!r}")
        self.kind, self.lr, self.momentum, self.tau = kind, lr, momentum, tau
        self.state = {}  # name -> {"m": tensor, "v": tensor}

    def step(self, global_params, aggregated):
        """The new global parameters from the current ones and FedAvg's result (both name -> tensor)."""
        new = {}
        for name, theta in global_params.items():
            delta = aggregated[name] - theta
            if self.kind == "fedavg":
                new[name] = theta + self.lr * delta
                continue
            slot = self.state.setdefault(name, {"m": torch.zeros_like(theta), "v": torch.zeros_like(theta)})
            if self.kind == "fedavgm":
                slot["m"] = self.momentum * slot["m"] + delta
                new[name] = theta + self.lr * slot["m"]
            else:
                slot["m"] = self.momentum * slot["m"] + (1 - self.momentum) * delta
                slot["v"] = 0.99 * slot["v"] + 0.01 * delta * delta
                new[name] = theta + self.lr * slot["m"] / (slot["v"].sqrt() + self.tau)
        return new

    def state_dict(self):
        return {name: dict(slot) for name, slot in self.state.items()}

    def load_state_dict(self, state):
        self.state = {name: dict(slot) for name, slot in (state or {}).items()}
