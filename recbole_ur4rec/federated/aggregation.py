"""FedAvg weighted by sample counts, with the client-failure rule and optional DP clipping and Gaussian noise.

The aggregator sees only parameter updates (``delta_k = theta_k - theta``) and sample counts ``n_k``; no client data.

    theta' = theta + sum_k n_k * c_k * delta_k / sum_k n_k  (+ noise)
    c_k    = min(1, dp_clip_norm / ||delta_k||_2)             (1 without clipping; the norm is over all aggregated parameters)
    noise  ~ N(0, (dp_noise_multiplier * dp_clip_norm * max_k n_k / sum_k n_k)^2) per coordinate

``dp_clip_norm * max_k n_k / sum_k n_k`` bounds how far one client can move the weighted average (its L2
sensitivity), so the noise is ``dp_noise_multiplier`` times that bound (Gaussian mechanism, as in DP-FedAvg,
McMahan et al., ICLR 2018, with sample-count weights). A client whose update holds a NaN or an infinity is left out.
"""
from logging import getLogger

import torch


class FedAvg:
    """Accumulates client updates of one round; :meth:`result` gives the new global parameters."""

    def __init__(self, global_params, clip_norm=None, noise_multiplier=0.0, generator=None):
        self.global_params = global_params  # name -> tensor (the aggregated parameters only)
        self.clip_norm, self.noise_multiplier, self.generator = clip_norm, noise_multiplier, generator
        self.sums = {name: torch.zeros_like(p) for name, p in global_params.items()}
        self.total, self.max_count, self.included, self.excluded = 0.0, 0.0, [], []

    def add(self, clients, deltas, counts):
        """Add the updates of ``clients`` (a list): ``deltas`` name -> [C ..], ``counts`` [C] sample counts.

        Returns:
            list: the clients left out because their update is not finite.
        """
        counts = torch.as_tensor(counts, dtype=torch.float64)
        flat = [deltas[name].reshape(len(clients), -1) for name in self.global_params]
        finite = torch.stack([f.isfinite().all(1) for f in flat]).all(0) if flat else torch.ones(len(clients), dtype=torch.bool)
        scale = torch.ones(len(clients), dtype=torch.float64)
        if self.clip_norm is not None and flat:
            norms = torch.sqrt(sum(f.double().nan_to_num(0.0, 0.0, 0.0).pow(2).sum(1) for f in flat))  # [C]
            scale = torch.clamp(self.clip_norm / norms.clamp(min=1e-12), max=1.0)
        weights = torch.where(finite, counts * scale, torch.zeros_like(counts))  # [C]
        for name in self.global_params:
            delta = torch.where(finite.view(-1, *[1] * (deltas[name].dim() - 1)), deltas[name], torch.zeros_like(deltas[name]))
            self.sums[name] += torch.tensordot(weights.to(delta.dtype), delta, dims=1)
        left_out = [c for c, ok in zip(clients, finite.tolist()) if not ok]
        for client in left_out:
            getLogger().warning(f"client {client}: non-finite update, left out of this round's aggregate")
        self.included += [c for c, ok in zip(clients, finite.tolist()) if ok]
        self.excluded += left_out
        if finite.any():
            self.total += float(counts[finite].sum())
            self.max_count = max(self.max_count, float(counts[finite].max()))
        return left_out

    def fail(self, client, error):
        """Leave out a client whose update raised ``error``."""
        getLogger().warning(f"client {client}: update failed ({type(error).__name__}: {error}), left out of this round's aggregate")
        self.excluded.append(client)

    def partial(self):
        """The running sums (a node's share of the round), for :meth:`merge` on the server: the server learns the
        node's weighted sum of its clients' updates, not the updates themselves."""
        return {
            "sums": {name: value.clone() for name, value in self.sums.items()}, "total": self.total,
            "max_count": self.max_count, "included": list(self.included), "excluded": list(self.excluded),
        }

    def merge(self, partial):
        """Add another aggregator's :meth:`partial` (clipping was applied there, per client)."""
        for name, value in self.sums.items():
            value += partial["sums"][name].to(value.dtype)
        self.total += float(partial["total"])
        self.max_count = max(self.max_count, float(partial["max_count"]))
        self.included += [int(c) for c in partial["included"]]
        self.excluded += [int(c) for c in partial["excluded"]]

    def result(self):
        """The new global parameters: unchanged when no client contributed."""
        if self.total == 0:
            getLogger().warning("no client contributed to this round: the global model is unchanged")
            return {name: p.clone() for name, p in self.global_params.items()}
        new = {}
        std = 0.0
        if self.clip_norm is not None and self.noise_multiplier > 0:
            std = self.noise_multiplier * self.clip_norm * self.max_count / self.total
        for name, p in self.global_params.items():
            update = self.sums[name] / self.total
            if std > 0:
                update = update + std * torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device)
            new[name] = p + update
        return new


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
