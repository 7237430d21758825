"""The reward model behind doubly robust: ridge regression of the reward on the context, per action.

DR's direct part needs q(x, a), the expected reward of action a in context x, for every logged
context and every action. `cross_fitted_q_hat` predicts each row with a model fitted on the other
folds, so a row's own noise never enters its prediction: DR stays unbiased and its interval keeps
its coverage (an in-sample fit would shrink the residuals the IPS part corrects).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stagegate.experiments.offpolicy import _actions, _vector

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class RidgeRewardModel:
    """q(x, a) = intercept[a] + standardised(x) @ coef[a].

    Features are standardised with the training mean and (population) standard deviation, so
    the penalty `l2` weighs every feature alike; intercepts are not penalised. An action with no
    training rows predicts the training mean reward.
    """

    mean: FloatArray  # (d,)
    scale: FloatArray  # (d,)
    intercept: FloatArray  # (K,)
    coef: FloatArray  # (K, d)
    l2: float

    @property
    def n_actions(self) -> int:
        return int(self.intercept.shape[0])

    def predict(self, contexts: npt.ArrayLike) -> FloatArray:
        """Predicted rewards (n, K) for every context and action."""
        x = _contexts(contexts)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"contexts have {x.shape[1]} features, the model {self.mean.shape[0]}")
        z = (x - self.mean) / self.scale
        return np.asarray(z @ self.coef.T + self.intercept, dtype=np.float64)


def _contexts(contexts: npt.ArrayLike) -> FloatArray:
    x = np.asarray(contexts, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"contexts must have shape (n, d), got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("contexts is empty")
    if not np.isfinite(x).all():
        raise ValueError("contexts must be finite")
    return x


def _inputs(
    contexts: npt.ArrayLike, actions: npt.ArrayLike, rewards: npt.ArrayLike, n_actions: int
) -> tuple[FloatArray, npt.NDArray[np.intp], FloatArray]:
    if n_actions < 1:
        raise ValueError(f"n_actions must be at least 1, got {n_actions}")
    x = _contexts(contexts)
    r = _vector("rewards", rewards)
    a = _actions(actions, n_actions)
    if not x.shape[0] == a.shape[0] == r.shape[0]:
        raise ValueError(
            f"inputs differ in length: contexts {x.shape[0]}, actions {a.shape[0]}, "
            f"rewards {r.shape[0]}"
        )
    return x, a, r


def fit_reward_model(
    contexts: npt.ArrayLike,
    actions: npt.ArrayLike,
    rewards: npt.ArrayLike,
    n_actions: int,
    *,
    l2: float = 1.0,
) -> RidgeRewardModel:
    """Fit one ridge regression per action on the rows that took it."""
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    x, a, r = _inputs(contexts, actions, rewards, n_actions)
    return _fit(x, a, r, n_actions, l2)


def _fit(
    x: FloatArray, a: npt.NDArray[np.intp], r: FloatArray, n_actions: int, l2: float
) -> RidgeRewardModel:
    d = x.shape[1]
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    intercept = np.full(n_actions, float(r.mean()))
    coef = np.zeros((n_actions, d))
    order = np.argsort(a, kind="stable")
    bounds = np.searchsorted(a[order], np.arange(n_actions + 1))
    for action in range(n_actions):
        rows = order[bounds[action] : bounds[action + 1]]
        if rows.size == 0:
            continue
        za, ra = z[rows], r[rows]
        # Centre within the action, so the unpenalised intercept drops out of the solve.
        z_mean, r_mean = za.mean(axis=0), ra.mean()
        zc = za - z_mean
        gram = zc.T @ zc + l2 * np.eye(d)
        # lstsq, not solve: with l2 = 0 and fewer rows than features the Gram matrix is singular
        # and the minimum-norm solution is the one ordinary least squares gives.
        beta = np.linalg.lstsq(gram, zc.T @ (ra - r_mean), rcond=None)[0]
        coef[action] = beta
        intercept[action] = r_mean - z_mean @ beta
    return RidgeRewardModel(mean=mean, scale=scale, intercept=intercept, coef=coef, l2=l2)


def cross_fitted_q_hat(
    contexts: npt.ArrayLike,
    actions: npt.ArrayLike,
    rewards: npt.ArrayLike,
    n_actions: int,
    *,
    folds: int = 5,
    l2: float = 1.0,
    seed: int | None = 0,
) -> FloatArray:
    """q_hat (n, K) where each row is predicted by a model fitted on the other folds."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    x, a, r = _inputs(contexts, actions, rewards, n_actions)
    n = x.shape[0]
    if n < folds:
        raise ValueError(f"{n} rows cannot be split into {folds} folds")
    fold = np.random.default_rng(seed).permutation(n) % folds
    q_hat = np.empty((n, n_actions))
    for k in range(folds):
        held_out = fold == k
        model = _fit(x[~held_out], a[~held_out], r[~held_out], n_actions, l2)
        q_hat[held_out] = model.predict(x[held_out])
    return q_hat
