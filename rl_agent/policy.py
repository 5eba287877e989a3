"""The built-in client-weighting policy: REINFORCE with a running baseline (DESIGN.md §6).

One small MLP is shared by every client (so the policy is permutation-equivariant and works for
any cohort size): its input is one client's features (:data:`FEATURES`: its ``META_COLUMNS`` row and
summary statistics of its score and proxy rows against the cohort), its output the mean ``mu_i`` of
a Gaussian on a logit. The action is ``a_i = sigmoid(x_i)``, ``x_i ~ N(mu_i, sigma)`` while exploring
and ``sigmoid(mu_i)`` otherwise; client ``i``'s weight is ``n_i * a_i``, so equal actions are
plain data-size weighting. The last layer starts at zero weights, so a fresh policy starts from
data-size weighting (plus exploration noise).

Learning is per step, contextual-bandit style: each reward updates the decision it follows with
advantage ``(r - b) / s``, ``b`` and ``s`` a running mean and std of past rewards (momentum
``baseline_momentum``). Proxy gains and the final test accuracy live on different scales, so each
kind of reward has its own baseline; a final reward is credited to every decision of the episode
(the run's stitching), as in episodic REINFORCE.

Files: the network's tensors in safetensors, and a JSON string under the header metadata key
``fedemu_policy`` (format, feature names, hidden size, hyper-parameters, baselines). Any problem
reading one is a one-line :class:`~emulator.errors.UserError` naming the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emulator.algorithms.stitch_weighting import META_COLUMNS
from emulator.config import RLConfig
from emulator.errors import UserError

FORMAT = 1
METADATA_KEY = "fedemu_policy"
# The rl_agent's own random stream id (emulator.seeding's ids are small integers).
RL_STREAM = 1000
INIT_LOGIT = 0.0  # a = 0.5 at the centre: room to weight a client up (x2) as well as down (x0)
LOGIT_BOUND = 4.0  # |mu_i - centre| < 4: weights from 0.02x to 1x of the largest share
STD_FLOOR = 1e-3  # proxy accuracies move in steps of ~1/test-set size
ADVANTAGE_CLIP = 5.0
GRAD_CLIP = 1.0

FEATURES = (
    *META_COLUMNS,
    "score_mean",  # mean of its standardised scores over the observed candidates
    "score_std",
    "score_corr",  # Pearson correlation of its score row with the data-weighted mean row
    "top_agrees",  # 1 when its best candidate is the data-weighted choice
    "proxy_gain_mean",  # mean / max of (its proxy with a candidate) - (its prefix proxy)
    "proxy_gain_max",
    "rel_log_samples",  # its log(1 + n) minus the cohort's mean
    "step",  # step / max_steps
)
_LOG_SAMPLES_SCALE = 0.1  # log(1 + n) ~ 0..12: scaled to O(1) like the other inputs


def client_features(obs: dict[str, np.ndarray]) -> np.ndarray:
    """Per-client feature rows [max_clients, len(FEATURES)] from an encoded observation (padding: 0)."""
    scores = np.asarray(obs["scores"], dtype=np.float64)
    proxies = np.asarray(obs["proxies"], dtype=np.float64)
    meta = np.asarray(obs["meta"], dtype=np.float64)
    cm = np.asarray(obs["client_mask"], dtype=np.float64) > 0.5
    km = np.asarray(obs["candidate_mask"], dtype=np.float64) > 0.5
    c = len(cm)
    feats = np.zeros((c, len(FEATURES)), dtype=np.float64)
    m = len(META_COLUMNS)
    feats[:, :m] = meta
    feats[:, 0] *= _LOG_SAMPLES_SCALE
    k = int(km.sum())
    if cm.any() and k:
        s = scores[:, km]
        feats[:, m] = s.mean(axis=1)
        feats[:, m + 1] = s.std(axis=1)
        n = np.where(cm, np.expm1(meta[:, 0]), 0.0)
        n = n if n.sum() > 0 else cm.astype(np.float64)
        mean_row = (n[:, None] * s).sum(axis=0) / n.sum()
        sc = s - s.mean(axis=1, keepdims=True)
        mc = mean_row - mean_row.mean()
        denom = np.sqrt((sc * sc).sum(axis=1) * (mc * mc).sum())
        feats[:, m + 2] = np.divide((sc * mc).sum(axis=1), denom, out=np.zeros(c), where=denom > 0)
        feats[:, m + 3] = (s.argmax(axis=1) == mean_row.argmax()).astype(np.float64)
        gains = proxies[:, km] - meta[:, 3:4]
        feats[:, m + 4] = gains.mean(axis=1)
        feats[:, m + 5] = gains.max(axis=1)
        logs = meta[cm, 0]
        feats[:, m + 6] = (meta[:, 0] - logs.mean()) * _LOG_SAMPLES_SCALE
    feats[:, m + 7] = float(np.asarray(obs["step"]).reshape(-1)[0])
    feats[~cm] = 0.0
    return feats.astype(np.float32)


def _net(inputs: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, 1))


def _seed(seed: int, what: int) -> int:
    state = np.random.SeedSequence(seed, spawn_key=(RL_STREAM, what)).generate_state(1, np.uint64)[0]
    return int(state >> 1)


@dataclass
class _Decision:
    feats: torch.Tensor  # [C, F]
    logits: torch.Tensor  # [C] the sampled x_i
    mask: torch.Tensor  # [C] bool


@dataclass
class _Baseline:
    mean: float = 0.0
    var: float = 0.0
    count: int = 0


class ReinforcePolicy:
    """The per-client Gaussian-logit policy and its REINFORCE learner (see the module docstring)."""

    kind = "reinforce"

    def __init__(
        self, *, hidden: int = 32, sigma: float = 0.5, lr: float = 0.01, baseline_momentum: float = 0.9,
        seed: int = 0,
    ) -> None:
        self.hidden = int(hidden)
        self.sigma = float(sigma)
        self.lr = float(lr)
        self.baseline_momentum = float(baseline_momentum)
        self.seed = int(seed)
        # Private generators: the policy never touches torch's global RNG, which the run uses.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, 0))
            self.net = _net(len(FEATURES), self.hidden)
        with torch.no_grad():
            last = self.net[-1]
            assert isinstance(last, nn.Linear)
            last.weight.zero_()
            last.bias.fill_(INIT_LOGIT)
        self._gen = torch.Generator().manual_seed(_seed(self.seed, 1))
        # AMSGrad: plain Adam blows single-sample REINFORCE noise up into lr-sized steps once the
        # policy has converged, and drifts off a good policy; the max of past second moments damps that.
        self._opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, amsgrad=True)
        self.baselines: dict[str, _Baseline] = {"step": _Baseline(), "final": _Baseline()}
        self.updates = 0
        self._pending: _Decision | None = None
        self._episode: list[_Decision] = []

    @classmethod
    def from_config(cls, rl: RLConfig, *, seed: int) -> ReinforcePolicy:
        return cls(hidden=rl.hidden, sigma=rl.sigma, lr=rl.lr, baseline_momentum=rl.baseline_momentum, seed=seed)

    # ---- acting ----------------------------------------------------------------------------------------
    def _mu(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """mu_i, centred on INIT_LOGIT over the observed clients (padding: INIT_LOGIT).

        Only relative weights matter (the server normalises them), so a common shift of the logits is a
        direction the reward never sees; left free, the optimiser's noise would drift it until the sigmoid
        saturates and every action is 1. Centring removes it.
        """
        raw = self.net(feats).squeeze(-1)  # [..., C]
        m = mask.to(raw.dtype)
        centre = (raw * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        # Bounded: a_i stays within [sigmoid(-B), sigmoid(B)] of the centre, a weight ratio of e^(2B) at most.
        # Unbounded logits run off to where exploration never changes a choice, and then drift on noise.
        mu = INIT_LOGIT + LOGIT_BOUND * torch.tanh((raw - centre) / LOGIT_BOUND)
        return torch.where(mask, mu, torch.full_like(raw, INIT_LOGIT))

    def mean_logits(self, obs: dict[str, np.ndarray]) -> torch.Tensor:
        """mu_i per client slot (padding: INIT_LOGIT), with gradients."""
        feats = torch.from_numpy(client_features(obs))
        return self._mu(feats, torch.from_numpy(np.asarray(obs["client_mask"]) > 0.5))

    def act(self, obs: dict[str, np.ndarray], *, explore: bool) -> np.ndarray:
        """Actions in [0, 1] per client slot (padding: 1); exploring records the decision for :meth:`learn`."""
        feats = torch.from_numpy(client_features(obs))
        mask = torch.from_numpy(np.asarray(obs["client_mask"]) > 0.5)
        with torch.no_grad():
            mu = self._mu(feats, mask)
            if explore:
                x = mu + self.sigma * torch.randn(mu.shape, generator=self._gen)
                decision = _Decision(feats=feats, logits=x, mask=mask)
                self._pending = decision
                self._episode.append(decision)
            else:
                x = mu
            a = torch.sigmoid(x).numpy().astype(np.float32)
        a[~mask.numpy()] = 1.0
        return a

    # ---- learning --------------------------------------------------------------------------------------
    def learn(self, reward: float, *, final: bool = False) -> float:
        """Update on one reward: the last decision's (``final=False``) or the episode's (``final=True``).

        Returns the advantage used (0 when there was nothing to update or no baseline yet).
        """
        if final:
            decisions, self._episode = self._episode, []
            self._pending = None
        else:
            decisions = [self._pending] if self._pending is not None else []
            self._pending = None
        reward = float(reward)
        if not math.isfinite(reward):
            return 0.0  # e.g. no evaluation: nothing to learn from
        base = self.baselines["final" if final else "step"]
        advantage = 0.0
        if base.count > 0:
            std = max(math.sqrt(base.var), STD_FLOOR)
            advantage = float(np.clip((reward - base.mean) / std, -ADVANTAGE_CLIP, ADVANTAGE_CLIP))
        m = self.baseline_momentum if base.count > 0 else 0.0
        delta = reward - base.mean
        base.mean = m * base.mean + (1 - m) * reward
        base.var = m * base.var + (1 - m) * delta * delta if base.count > 0 else 0.0
        base.count += 1
        if decisions and advantage != 0.0:
            self._update(decisions, advantage)
        return advantage

    def end_episode(self) -> None:
        """Forget the decisions of an episode that ended without a final reward."""
        self._episode = []
        self._pending = None

    # ---- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything a fresh policy of the same hyper-parameters needs to continue exactly as this one.

        Arrays: the network, Adam's moments and step counts, the exploration generator's state, the
        undecided ``_pending`` decision and the episode's decisions (credited by the final reward).
        JSON: :meth:`metadata` (the baselines, the update count, the hyper-parameters, checked on load).
        """
        arrays = {f"net/{k}": v.detach().numpy().copy() for k, v in self.net.state_dict().items()}
        opt = self._opt.state_dict()
        for i, state in opt["state"].items():
            for name, value in state.items():
                arrays[f"opt/{i}/{name}"] = torch.as_tensor(value).detach().numpy().copy()
        arrays["gen"] = self._gen.get_state().numpy().copy()
        groups = {"pending": [self._pending] if self._pending is not None else [], "episode": self._episode}
        for key, decisions in groups.items():
            if decisions:  # no zero-length arrays in the file
                arrays[f"{key}/feats"] = torch.stack([d.feats for d in decisions]).numpy().copy()
                arrays[f"{key}/logits"] = torch.stack([d.logits for d in decisions]).numpy().copy()
                arrays[f"{key}/mask"] = torch.stack([d.mask for d in decisions]).numpy().astype(np.uint8)
        return arrays, self.metadata()

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the hyper-parameters must match this policy's (same config)."""
        mine = {"hidden": self.hidden, "sigma": self.sigma, "lr": self.lr,
                "baseline_momentum": self.baseline_momentum}
        diff = {k: (meta.get(k), v) for k, v in mine.items() if meta.get(k) != v}
        if diff:
            raise UserError(f"the checkpoint's RL policy has other settings than [rl]: {diff} (saved, now); "
                            "resume with the run's own config")
        self.net.load_state_dict({k[4:]: torch.from_numpy(np.array(v)) for k, v in arrays.items()
                                  if k.startswith("net/")}, strict=True)
        opt = self._opt.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in arrays.items():
            if key.startswith("opt/"):
                _, i, name = key.split("/", 2)
                state.setdefault(int(i), {})[name] = torch.from_numpy(np.array(value))
        opt["state"] = state
        self._opt.load_state_dict(opt)
        self._gen.set_state(torch.from_numpy(np.array(arrays["gen"], dtype=np.uint8)))

        def decisions(key: str) -> list[_Decision]:
            if f"{key}/feats" not in arrays:
                return []
            feats, logits = (torch.from_numpy(np.array(arrays[f"{key}/{n}"])) for n in ("feats", "logits"))
            mask = torch.from_numpy(np.array(arrays[f"{key}/mask"]).astype(bool))
            return [_Decision(feats=f, logits=x, mask=m) for f, x, m in zip(feats, logits, mask, strict=True)]

        pending = decisions("pending")
        self._pending = pending[0] if pending else None
        self._episode = decisions("episode")
        self.seed = int(meta["seed"])
        self._restore_counters(meta)

    def _restore_counters(self, meta: dict[str, Any]) -> None:
        """The update count and the reward baselines, from a policy file's or a checkpoint's metadata."""
        for key, (mean, var, count) in dict(meta.get("baselines", {})).items():
            if key in self.baselines:
                self.baselines[key] = _Baseline(float(mean), float(var), int(count))
        self.updates = int(meta.get("updates", 0))

    def _update(self, decisions: list[_Decision], advantage: float) -> None:
        loss = torch.zeros(())
        for d in decisions:
            mu = self._mu(d.feats, d.mask)
            # log N(x; mu, sigma) up to a constant; padding slots excluded.
            logp = -0.5 * ((d.logits - mu) / self.sigma) ** 2
            loss = loss - advantage * logp[d.mask].sum()
        loss = loss / len(decisions)
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.net.parameters(), GRAD_CLIP)
        self._opt.step()
        self.updates += 1

    def fit_actions(self, observations: list[dict[str, np.ndarray]], actions: list[np.ndarray], *,
                    epochs: int = 500) -> float:
        """Fit mu to reproduce given actions (distilling another policy); returns the final mean squared error.

        Only relative weights matter, so the target is each step's centred logit(a), within the logit bound.
        """
        feats = torch.from_numpy(np.stack([client_features(o) for o in observations]))  # [B, C, F]
        mask = torch.from_numpy(np.stack([np.asarray(o["client_mask"]) > 0.5 for o in observations]))
        a = torch.from_numpy(np.stack([np.asarray(x, dtype=np.float64) for x in actions])).clamp(1e-3, 1 - 1e-3)
        logit = torch.log(a / (1 - a)).float().clamp(-6.0, 6.0)
        m = mask.float()
        centred = logit - (logit * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        target = INIT_LOGIT + centred.clamp(-0.95 * LOGIT_BOUND, 0.95 * LOGIT_BOUND)
        opt = torch.optim.Adam(self.net.parameters(), lr=max(self.lr, 1e-3))
        loss = torch.zeros(())
        for _ in range(epochs):
            loss = ((self._mu(feats, mask) - target)[mask] ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return float(loss.detach())

    # ---- files -----------------------------------------------------------------------------------------
    def metadata(self, **extra: Any) -> dict[str, Any]:
        return {
            "format": FORMAT, "kind": self.kind, "features": list(FEATURES), "input_size": len(FEATURES),
            "hidden": self.hidden, "sigma": self.sigma, "lr": self.lr,
            "baseline_momentum": self.baseline_momentum, "seed": self.seed, "updates": self.updates,
            "baselines": {k: [b.mean, b.var, b.count] for k, b in self.baselines.items()}, **extra,
        }

    def save(self, path: Path | str, **extra: Any) -> Path:
        """Write the network and its metadata (``extra``: more JSON-able metadata, e.g. how it was trained)."""
        from safetensors.torch import save_file

        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
            save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(self.metadata(**extra))})
        except OSError as err:
            raise UserError(f"cannot write policy file {path}: {err.strerror or err}") from None
        return path

    @classmethod
    def load(cls, path: Path | str, *, rl: RLConfig | None = None, seed: int | None = None) -> ReinforcePolicy:
        """Read a policy file; ``rl`` (when given) overrides the learning hyper-parameters, not the network.

        The optimizer state is not saved: a loaded policy continues with a fresh Adam.
        """
        path = Path(path)
        meta, tensors = read_policy_file(path)
        try:
            policy = cls(
                hidden=int(meta["hidden"]),
                sigma=float(rl.sigma if rl else meta["sigma"]),
                lr=float(rl.lr if rl else meta["lr"]),
                baseline_momentum=float(rl.baseline_momentum if rl else meta["baseline_momentum"]),
                seed=int(meta.get("seed", 0) if seed is None else seed),
            )
            policy._restore_counters(meta)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"policy file {path}: bad metadata ({type(err).__name__}: {err})") from None
        try:
            policy.net.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            first = " ".join(str(err).split())[:300]
            raise UserError(f"policy file {path}: its tensors do not match hidden = {policy.hidden}: {first}") from None
        return policy


def read_policy_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors of a policy file, checked; one-line UserErrors otherwise."""
    from safetensors import safe_open

    if not path.exists():
        raise UserError(f"policy file {path} not found; set stitch.policy to a file from `fedemu rl train`")
    if path.is_dir():
        raise UserError(f"policy file {path} is a directory; give a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types (and OSError) for bad files
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise UserError(f"policy file {path} is not a readable safetensors file ({reason})") from None
    raw = header.get(METADATA_KEY)
    if raw is None:
        raise UserError(
            f"policy file {path} has no {METADATA_KEY!r} metadata; write policies with `fedemu rl train` or rl.save"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UserError(f"policy file {path}: corrupt {METADATA_KEY!r} metadata ({err.msg})") from None
    if not isinstance(meta, dict):
        raise UserError(f"policy file {path}: corrupt {METADATA_KEY!r} metadata (not a JSON object)")
    if meta.get("format") != FORMAT or meta.get("kind") != ReinforcePolicy.kind:
        raise UserError(
            f"policy file {path}: format {meta.get('format')!r} kind {meta.get('kind')!r}; "
            f"this fedemu reads format {FORMAT} kind {ReinforcePolicy.kind!r}"
        )
    if list(meta.get("features", [])) != list(FEATURES):
        raise UserError(
            f"policy file {path} was trained on features {meta.get('features')}, this fedemu uses "
            f"{list(FEATURES)}; retrain it with `fedemu rl train`"
        )
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"policy file {path}: non-finite values in {', '.join(sorted(bad))}")
    return meta, tensors
