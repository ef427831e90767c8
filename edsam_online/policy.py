"""How a producer picks each sample's alpha: Eq. 9's blind draw, or steered by the trainers' loss.

ED-SAM's objective is a worst case (Eq. 5); its Lagrangian form (Eq. 6) asks for the sample
that maximises the CLIP loss minus ``lambda`` times its transport cost. Offline, the paper has
no model to ask and draws ``alpha ~ U(-rho, rho)`` (Eq. 9): ``policy="uniform"``. Online, the
trainers report each generated sample's own contrastive loss back to the producer that made
it, and ``policy="adversarial"`` (:class:`AdversarialPolicy`) learns which alphas the model
currently finds hard.

**The algorithm: a Boltzmann bandit over alpha bins.** ``[-rho, rho]`` is cut into ``bins``
equal bins. Each bin keeps a discounted mean of the *reward* of the samples drawn in it;
a bin's value is that mean minus ``lam`` times its normalised transport cost (Proposition 1:
``W2^2 = d * alpha^2``; divided by ``d * rho^2``, the cost of a bin is the mean of
``(alpha / rho)^2`` over it, in [0, 1]). A draw picks a bin with probability
``explore / bins + (1 - explore) * softmax(value / temperature)`` and ``alpha`` uniformly in
it, so every alpha in range keeps being tried (``explore`` is the floor). Chosen over the
cross-entropy method, whose Gaussian can collapse onto one alpha and cannot hold two modes,
and over UCB or Thompson sampling, whose stationarity assumption the training model breaks:
the bins are one-dimensional, the feedback arrives late and in batches, and a softmax with a
floor gives a graded preference that follows the model as it learns.

**Rewards do not pay for unfaithfulness.** The hardest sample is often a wrong one: a
sample that lost its caption's class has a high loss because it teaches a false pair. A
sample earns its loss only when the producer's fidelity scorer passed it (``score >=
min_score``) and earns 0 otherwise, so a bin whose samples lose their content loses value
in proportion. The policy therefore needs a scorer (``producer.scorer``).

**Older feedback counts less.** A loss measured at model step ``s`` weighs
``2 ** (-(S - s) / half_life_steps)``, where ``S`` is the newest model step heard from;
the sums of every bin decay by the same rule as ``S`` advances.

**No feedback, no steering.** Until ``min_feedback`` (discounted) samples have been heard,
:meth:`AdversarialPolicy.draw` returns None and the producer draws as ``uniform`` does,
bit for bit; a bin with less than ``min_feedback / bins`` of weight is valued at the mean
over all bins. Given the same feedback in the same order and the same seed, the choices are
the same.

**It survives a restart.** The policy lives in its producer, which saves it to the run folder
(:func:`save_policy`, ``policy/producer<rank>.msgpack``: the bins' sums, the newest model step,
the draw generator's state) every ``producer.log_every_s`` and when it stops; a producer of
the same rank started on that run folder (launch.sh's restart after a crash, a resumed run)
goes on from it (:func:`load_policy`) instead of relearning from Eq. 9's draws.

No library implements a bandit over a continuous transport parameter with delayed,
discounted, fidelity-gated rewards (the Vowpal Wabbit and ``mabwiser`` bandits assume
discrete arms and immediate rewards), hence this module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from edsam_online.validation import require_at_least, require_positive

POLICIES = ("uniform", "adversarial")
STATE_FORMAT = "edsam-policy/1"


@dataclass
class AdversarialConfig:
    """Settings of ``producer.policy=adversarial`` (Hydra key ``producer.adversarial``).

    ``lam`` is Eq. 6's lambda, in nats of trainer loss per unit of normalised transport cost;
    ``temperature`` is the softmax's, in nats: about the standard error of a bin's mean (one
    sample's loss varies by about a nat, and a bin hears a few dozen distinct samples within a
    half-life), so noise alone does not pull the draws; ``explore`` the share of draws spread
    uniformly over ``[-rho, rho]``; the rest as the module docstring says. Chosen before any
    study run, not tuned."""

    bins: int = 15
    lam: float = 0.5
    temperature: float = 0.2
    explore: float = 0.1
    half_life_steps: float = 200.0
    min_score: float = 1.0
    min_feedback: float = 64.0

    def __post_init__(self) -> None:
        require_at_least(self, 2, "bins")
        require_at_least(self, 0, "lam", "min_feedback")
        require_positive(self, "temperature", "half_life_steps")
        if not 0 < self.explore <= 1:
            raise ValueError(f"explore must be in (0, 1], got {self.explore}")
        if not 0 <= self.min_score <= 1:
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score}")


def bin_edges(rho: float, bins: int) -> np.ndarray:
    """The ``bins + 1`` edges of the policy's equal alpha bins over ``[-rho, rho]`` (also what
    ``policy/*/<bin>`` and ``train/alpha_hist/<bin>`` index)."""
    return np.linspace(-rho, rho, bins + 1)


class AdversarialPolicy:
    """The steered alpha of ``producer.policy=adversarial`` for one producer (module docstring);
    its draws come from a generator seeded with ``seed``."""

    def __init__(self, rho: float, cfg: AdversarialConfig, seed: int | Sequence[int] = 0):
        if not (rho >= 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be a finite number >= 0, got {rho}")
        self.rho, self.cfg = float(rho), cfg
        self.edges = bin_edges(self.rho, cfg.bins)
        lo, hi = self.edges[:-1], self.edges[1:]
        # mean of (alpha / rho)^2 over each bin, alpha uniform in it
        self.cost = (lo**2 + lo * hi + hi**2) / 3 / max(self.rho, 1e-12) ** 2
        self.reward_sum = np.zeros(cfg.bins)
        self.weight = np.zeros(cfg.bins)
        self.newest_step: int | None = None
        self.applied = 0
        self._rng = np.random.default_rng(seed)

    def bin_of(self, alpha: np.ndarray) -> np.ndarray:
        """Each alpha's bin (alphas at or beyond +-rho fall in the end bins)."""
        return np.clip(np.searchsorted(self.edges, alpha, side="right") - 1, 0, self.cfg.bins - 1)

    def update(self, alpha: np.ndarray, score: np.ndarray, loss: np.ndarray, model_step: np.ndarray) -> int:
        """Learn from feedback: per sample, the alpha and fidelity score it was made with (the
        producer's own record, not the trainer's word), the trainer's loss on it and the model
        step at which that loss was measured. Entries whose loss or step is not finite, or
        whose loss is negative, are skipped. Returns how many were applied."""
        alpha, score, loss, step = (np.asarray(a, dtype=np.float64).ravel() for a in (alpha, score, loss, model_step))
        ok = np.isfinite(alpha) & np.isfinite(loss) & (loss >= 0) & np.isfinite(step) & (np.abs(alpha) <= self.rho)
        if not ok.any():
            return 0
        alpha, score, loss, step = alpha[ok], score[ok], loss[ok], step[ok].astype(np.int64)
        newest = int(step.max())
        if self.newest_step is None:
            self.newest_step = newest
        elif newest > self.newest_step:
            decay = 2.0 ** (-(newest - self.newest_step) / self.cfg.half_life_steps)
            self.reward_sum *= decay
            self.weight *= decay
            self.newest_step = newest
        w = 2.0 ** (-(self.newest_step - step) / self.cfg.half_life_steps)
        reward = np.where(np.nan_to_num(score, nan=-1.0) >= self.cfg.min_score, loss, 0.0)
        bins = self.bin_of(alpha)
        np.add.at(self.reward_sum, bins, w * reward)
        np.add.at(self.weight, bins, w)
        self.applied += len(alpha)
        return len(alpha)

    def estimates(self) -> np.ndarray:
        """Each bin's discounted mean reward (the pooled mean where a bin has heard too little;
        NaN everywhere before any feedback)."""
        total = self.weight.sum()
        if total <= 0:
            return np.full(self.cfg.bins, np.nan)
        pooled = self.reward_sum.sum() / total
        enough = self.weight >= self.cfg.min_feedback / self.cfg.bins
        return np.where(enough, self.reward_sum / np.maximum(self.weight, 1e-300), pooled)

    def probabilities(self) -> np.ndarray | None:
        """The probability of drawing each bin; None while the policy draws as ``uniform``."""
        heard = self.weight.sum()
        if self.rho == 0 or heard == 0 or heard < self.cfg.min_feedback:
            return None
        value = self.estimates() - self.cfg.lam * self.cost
        logits = (value - value.max()) / self.cfg.temperature
        soft = np.exp(logits)
        soft /= soft.sum()
        return self.cfg.explore / self.cfg.bins + (1 - self.cfg.explore) * soft

    def draw(self, n: int) -> np.ndarray | None:
        """``n`` alphas in ``[-rho, rho]`` (float32), or None: draw as ``uniform`` does."""
        p = self.probabilities()
        if p is None:
            return None
        bins = self._rng.choice(self.cfg.bins, size=n, p=p)
        lo, hi = self.edges[bins], self.edges[bins + 1]
        return (lo + (hi - lo) * self._rng.random(n)).astype(np.float32)


def policy_file(run_dir: str | os.PathLike, rank: int) -> Path:
    """Where producer ``rank`` keeps its policy in the run folder ``run_dir``."""
    return Path(run_dir) / "policy" / f"producer{rank}.msgpack"


def save_policy(policy: AdversarialPolicy, path: str | os.PathLike) -> None:
    """Write what ``policy`` has learned to ``path`` (msgpack; atomically: a reader sees the
    old file or the new one)."""
    rng = policy._rng.bit_generator.state
    state = {"format": STATE_FORMAT, "bins": policy.cfg.bins, "rho": policy.rho,
             "reward_sum": policy.reward_sum.tolist(), "weight": policy.weight.tolist(),
             "newest_step": policy.newest_step, "applied": policy.applied,
             # PCG64's state is two 128-bit integers, wider than msgpack's: as decimal strings
             "rng": [rng["bit_generator"], str(rng["state"]["state"]), str(rng["state"]["inc"]),
                     rng["has_uint32"], rng["uinteger"]]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(msgpack.packb(state))
    os.replace(tmp, path)


def load_policy(policy: AdversarialPolicy, path: str | os.PathLike) -> None:
    """Make ``policy`` the one :func:`save_policy` wrote to ``path``: same sums, newest step
    and draws. Raises ValueError, leaving ``policy`` as it was, for a file that is not such a
    state (damaged, foreign) or one of another ``rho`` or bin count."""
    try:
        state = msgpack.unpackb(Path(path).read_bytes(), raw=False, strict_map_key=True)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not format {STATE_FORMAT}")
        if state["bins"] != policy.cfg.bins or state["rho"] != policy.rho:
            raise ValueError(f"saved for rho {state['rho']} and {state['bins']} bins; this policy has rho "
                             f"{policy.rho} and {policy.cfg.bins} bins")
        reward_sum, weight = (np.asarray(state[k], dtype=np.float64) for k in ("reward_sum", "weight"))
        if reward_sum.shape != (policy.cfg.bins,) or weight.shape != (policy.cfg.bins,) or not (
                np.isfinite(reward_sum).all() and np.isfinite(weight).all() and (weight >= 0).all()):
            raise ValueError("bin sums are not finite, or weights negative")
        newest, applied = state["newest_step"], state["applied"]
        if not (newest is None or isinstance(newest, int)) or not isinstance(applied, int) or applied < 0:
            raise ValueError("newest_step or applied is not an integer")
        name, rng_state, inc, has_uint32, uinteger = state["rng"]
        rng = np.random.default_rng()
        rng.bit_generator.state = {"bit_generator": name, "state": {"state": int(rng_state), "inc": int(inc)},
                                   "has_uint32": has_uint32, "uinteger": uinteger}
    except ValueError as err:
        raise ValueError(f"{path} is not a saved policy state ({err})") from None
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways; none may stop a producer
        raise ValueError(f"{path} is not a saved policy state ({type(err).__name__}: {err})") from None
    policy.reward_sum, policy.weight, policy.newest_step, policy.applied = reward_sum, weight, newest, applied
    policy._rng = rng
