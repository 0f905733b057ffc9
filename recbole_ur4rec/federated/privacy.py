"""What a node guarantees its users whatever the server asks (:class:`NodePolicy`), the node-side Gaussian noise of
user-level differential privacy (:func:`node_noise`) and its accountant (:class:`UserLevelAccountant`).

DP (``dp_noise_multiplier`` z > 0, ``dp_clip_norm`` C): every user's update of the aggregated parameters is clipped
to L2 norm C and weighted 1 (a sample count is the user's data and would scale the sensitivity), and the node adds
``N(0, (2 z C)^2)`` per coordinate to the sum over its sampled users before the sum leaves it. Neighbouring datasets
differ in one user's data (replace-one): that user's clipped update moves the node's sum by at most ``2C`` (from
``u`` to ``u'``, ``||u - u'|| <= ||u|| + ||u'||``; add/remove-one would be ``C``), so the reply is the Gaussian
mechanism with noise multiplier z, on its own: the guarantee holds against the server (which sees the reply, or
only the sum of replies under SecAgg+) without trusting SecAgg+, the other nodes or the server's word about who
takes part. The server divides the sum by the round's number of sampled users, which it chose (public), so
averaging is post-processing. The cost of node-local noise: with m nodes in a round the aggregate holds m noise
draws, sqrt(m) times the std of noise added once centrally.

The noise comes from :func:`secure_generator` (128 bits from the OS's CSPRNG, :mod:`secrets`), never from the run's
seed: no config, checkpoint or round index regenerates it.

The accountant: the server chose the round samples (from the seed), so it knows in which rounds a user took part;
there is no amplification by subsampling against it. A user's loss is the composition of the Gaussian mechanism
over the rounds it took part in (RDP, Mironov 2017, with Opacus' RDP accountant and its conversion to
(epsilon, delta)); the reported epsilon is the worst user's, the one sampled most often so far.

This module imports neither torch nor Opacus at import time: the ClientApp reads :data:`TEST_HOOKS_ENV` and
:attr:`NodePolicy.KEYS` from it.
"""
import math
import secrets
import warnings
from dataclasses import dataclass, fields

import numpy as np

TEST_HOOKS_ENV = "RECBOLE_UR4REC_TEST_HOOKS"  # "1" on a loopback test federation only (see apps/flower/loopback.py)
SECAGG_MIN_NODES = 3  # with 2, each node can subtract its own vector from the sum and learn the other's


class PrivacyRefusal(ValueError):
    """A node refuses a request that would let per-user information leave it; the message says why."""


@dataclass(frozen=True)
class NodePolicy:
    """A node's own limits on what it answers (its operator's settings; the server cannot change them).

    Attributes:
        min_users (int): fewest users a training or evaluation reply may cover (fewer: refused).
        secagg_only (bool): refuse every training request outside SecAgg+.
        max_evaluations (int): evaluation requests answered per run (then refused).
        max_clip_norm (float or None): the largest ``dp_clip_norm`` the server may ask for (None: any).
        min_noise_multiplier (float): the smallest ``dp_noise_multiplier`` the server may ask for (0: DP optional).
    """

    min_users: int = 5
    secagg_only: bool = False
    max_evaluations: int = 300
    max_clip_norm: float = None
    min_noise_multiplier: float = 0.0

    KEYS = ("min-users", "secagg-only", "max-evaluations", "max-clip-norm", "min-noise-multiplier")

    @classmethod
    def from_settings(cls, settings, where):
        """The policy from ``settings`` (a dict with the keys of :attr:`KEYS`, missing ones at their defaults);
        ``where`` names the settings in errors (e.g. "node config", "config key 'node_policy'")."""
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown node policy key(s) {unknown}; expected any of {', '.join(cls.KEYS)}")
        values = {}
        for key in cls.KEYS:
            if key not in settings or settings[key] in (None, ""):
                continue
            value = settings[key]
            if key == "secagg-only":
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    value = value.lower() == "true"
                if not isinstance(value, bool):
                    raise ValueError(f"{where}: '{key}' must be true or false, got {value!r}")
            elif key in ("min-users", "max-evaluations"):
                if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit() or int(value) < 1:
                    raise ValueError(f"{where}: '{key}' must be an int >= 1, got {value!r}")
                value = int(value)
            else:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    value = float("nan")
                if not math.isfinite(value) or value < 0 or (key == "max-clip-norm" and value == 0):
                    raise ValueError(f"{where}: '{key}' must be a number {'> 0' if key == 'max-clip-norm' else '>= 0'}, got {settings[key]!r}")
            values[key.replace("-", "_")] = value
        return cls(**values)

    def as_settings(self):
        """The policy as settings (:meth:`from_settings` reads them back)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def check_users(self, count, what):
        if count < self.min_users:
            raise PrivacyRefusal(
                f"{what} would cover {count} user(s); this node answers for at least {self.min_users} (node policy "
                "'min-users'): a reply over fewer users comes too close to one user's own values"
            )

    def check_dp(self, clip_norm, noise_multiplier):
        """Refuse DP settings outside the node's limits."""
        if self.max_clip_norm is not None and (clip_norm is None or clip_norm > self.max_clip_norm):
            raise PrivacyRefusal(
                f"the server asks for dp_clip_norm {clip_norm}; this node allows at most {self.max_clip_norm} (node policy "
                "'max-clip-norm'): a larger norm lets one user move the reply further"
            )
        if noise_multiplier < self.min_noise_multiplier:
            raise PrivacyRefusal(
                f"the server asks for dp_noise_multiplier {noise_multiplier}; this node adds at least "
                f"{self.min_noise_multiplier} (node policy 'min-noise-multiplier')"
            )


def check_orders(users, orders, n_rows, node):
    """Refuse row orders that are not, per user and local epoch, a permutation of the user's own rows on this node
    (a repeated row would weight one interaction as the server likes)."""
    for user in users:
        for epoch, order in enumerate(orders[user]):
            values = np.sort(np.asarray(order, dtype=np.int64).reshape(-1))
            if len(values) != n_rows[user] or not np.array_equal(values, np.arange(n_rows[user])):
                raise PrivacyRefusal(
                    f"the round plan's row order of user {user}, local epoch {epoch}, is not a permutation of the "
                    f"user's {n_rows[user]} training rows on node {node}: refused"
                )


def secure_generator():
    """A numpy Generator seeded with 128 bits from the OS's CSPRNG (:mod:`secrets`): not reproducible from any
    config, seed or checkpoint."""
    return np.random.default_rng(secrets.randbits(128))


def node_noise_std(clip_norm, noise_multiplier):
    """The std of the noise a node adds to its sum of clipped updates: ``2 * z * C`` (replace-one sensitivity 2C)."""
    return 2.0 * float(noise_multiplier) * float(clip_norm)


def node_noise(shapes, std, rng=None):
    """``N(0, std^2)`` arrays (name -> float64 array) of ``shapes`` (name -> shape) from ``rng`` (default: a fresh
    :func:`secure_generator`)."""
    rng = rng or secure_generator()
    return {name: np.asarray(rng.standard_normal(tuple(shape)) * std) for name, shape in shapes.items()}


class UserLevelAccountant:
    """Epsilon at ``delta`` of user-level DP over the rounds run so far (see the module docstring).

    Args:
        noise_multiplier (float): z, the noise std over the replace-one sensitivity.
        delta (float): the delta of the reported (epsilon, delta).
    """

    ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 128, 256, 512, 1024]

    def __init__(self, noise_multiplier, delta):
        self.noise_multiplier, self.delta = float(noise_multiplier), float(delta)
        self.participations = {}  # user -> rounds taken part in

    def step(self, users):
        """Count a round in which ``users`` were sampled (a user left out of the aggregate counts too)."""
        for user in users:
            self.participations[int(user)] = self.participations.get(int(user), 0) + 1

    def max_participations(self):
        return max(self.participations.values(), default=0)

    def epsilon(self, rounds=None):
        """Epsilon of ``rounds`` compositions of the Gaussian mechanism (default: the worst user's so far)."""
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        rounds = self.max_participations() if rounds is None else rounds
        if rounds == 0:
            return 0.0
        rdp = compute_rdp(q=1.0, noise_multiplier=self.noise_multiplier, steps=rounds, orders=self.ORDERS)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")
            eps, _ = get_privacy_spent(orders=self.ORDERS, rdp=rdp, delta=self.delta)
        return float(eps)

    def state_dict(self):
        return {"users": sorted(self.participations), "counts": [self.participations[u] for u in sorted(self.participations)]}

    def load_state_dict(self, state):
        self.participations = dict(zip((int(u) for u in state["users"]), (int(c) for c in state["counts"]))) if state else {}
