"""Shared by the issue 12 refits (information_bound.py, multi_hop_gate.py, later_pass_rate.py):
next-use models with extra feature columns, fitted on the positions ``next_use.walk`` yields, their
AUC per group, and a replay of hybrid whose planner state is one of those states."""
import numpy as np
from expertmap.bench.simulator import access_trace, replay
from expertmap.predictor import next_use as nu
from expertmap.predictor.policies import make_policy


class XModel:
    """A next-use model over any number of feature columns (NextUseModel checks the shipped ones)."""

    def __init__(self, weights):
        self._w = np.asarray(weights)  # [G, F]

    def probabilities(self, x):
        return nu._sigmoid(x @ self._w.T)  # [N, G]


def samples(traces, index, state):
    """(x [N, F], group [N], label [N]) over every position of ``traces``, next pass labels."""
    xs, gs, ys = [], [], []
    for st, label in nu.walk(traces, index, state.L, state.J, state=state):
        x, g, _ = st.features()
        xs.append(x.astype(np.float32)); gs.append(g); ys.append(label)
    return np.concatenate(xs), np.concatenate(gs), np.concatenate(ys)


def fit(x, g, y):
    return XModel([nu._logistic(x[g == k].astype(np.float64), y[g == k], 1.0, 25) for k in range(3)])


def auc(model, x, g, y):
    """Per group (next layer by gate, later layers, next iteration), from the ranks."""
    p = model.probabilities(x)[np.arange(len(g)), g]
    out = []
    for k in range(3):
        s = g == k; yy, pp = y[s], p[s]
        r = np.empty(len(pp)); r[np.argsort(pp)] = np.arange(len(pp))
        out.append(round((r[yy == 1].mean() - (yy.sum() - 1) / 2) / (len(yy) - yy.sum()), 3))
    return out


def replay_with(policy, make_state, model, evals, slots, ratio):
    """Replay hybrid ``policy`` with its planner's state made by ``make_state()`` (after every
    reset) and next-use ``model`` (None: the policy's own): {"hit", "tpot"} in the replay's units."""
    core = policy.core
    reset = core.reset

    def fresh_state():
        reset(); core.state = make_state()
    core.reset = fresh_state
    core.reset()
    if model is not None:
        core.model = model
    res = replay(policy, evals, slots, ratio)
    return {"hit": res.stats.hit_rate, "tpot": float(np.mean(res.iteration_units))}


def gap_line(label, row, base, oracle, tag="tune40", ratio=None):
    gap = (row["hit"] - base["hit"]) / (oracle["hit"] - base["hit"])
    return f"{tag} r={ratio} {label:14s} hit {row['hit']:.3f} gap {gap:+.2f} tpot {row['tpot'] / base['tpot']:.2f}x"


def compare(label, make_state, factory, evals, ratios=(13.1, 1.0), tag="tune40", model=None):
    """For each ratio: on-demand, the oracle, hybrid as shipped by ``factory`` and hybrid with
    ``make_state()`` as its planner state; prints the two hybrid rows' gap lines."""
    from exp import run

    L, J, k = factory.shape
    for r in ratios:
        base = run("on-demand", evals, factory, 32, r); orc = run("oracle", evals, factory, 32, r)
        shipped = run("hybrid", evals, factory, 32, r)
        pol = make_policy("hybrid", factory.inputs("hybrid", access_trace(evals), True, None).context(L, J, k, 32, True, copy_layers=r))
        row = replay_with(pol, make_state, model, evals, 32, r)
        for name, x_ in (("next-pass rule", shipped), (label, row)):
            print(gap_line(name, x_, base, orc, tag=tag, ratio=r), flush=True)
