"""Run a whole `cifarlab study`, SIGKILLed during a stage-2 sweep and during final training, and check the end.

    CIFARLAB_DATA=PATH python benchmarks/study_run.py configs/studies/cpu-hour.yaml [--out DIR] [--no-kill]

Three processes, as a user whose machine died twice would run them: the study is started, SIGKILLed
(the whole process group: sweep workers too) once the first model's stage-2 sweep has a finished trial
in its storage; started again, SIGKILLed once the first model's final training has logged its second
epoch; started a third time, it runs to its report. Then, from the study's own files:

- no trial was repeated: every sweep holds exactly its budget of counted trials, and each trial finished
  before a kill has the same number and value after it;
- the resumed final seed did not redo an epoch (its ``metrics.csv`` counts 1..E once);
- the report's significance table agrees with a hand computation from the saved ``test_logits.npz``:
  McNemar's exact p-value (SciPy's binomial test on the discordant pairs), its ``n01``/``n10``, and the
  accuracy differences.

It prints the wall time of each process and the report's headline table; the last line is JSON:
``{"study": NAME, "wall_s": [..], "total_s": T, "repeated_trials": 0, "significance_checked": K,
"headline": [{"model": M, "test_acc_mean": A, "ci95": [L, H], "test_loss_mean": L, "seeds": N}], ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)


def trials(sweep_dir: Path) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    info_file = sweep_dir / "study.json"
    if not info_file.is_file():
        return []
    info = json.loads(info_file.read_text())
    try:
        return optuna.load_study(study_name=info["study"], storage=info["storage"]).get_trials(deepcopy=False)
    except KeyError:
        return []


def run_until(proc: subprocess.Popen, log: Path, after: str, then: str, ready=None, poll: float = 0.5) -> bool:
    """SIGKILL the process group once ``then`` follows ``after`` in the log (and ``ready()``); False if it ended."""
    while proc.poll() is None:
        text = log.read_text(errors="replace")
        i = text.find(after)
        if i >= 0 and then in text[i:] and (ready is None or ready()):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(poll)
    return False


def mcnemar_by_hand(a_right: np.ndarray, b_right: np.ndarray) -> tuple[int, int, float]:
    from scipy.stats import binomtest

    n01, n10 = int(np.sum(~a_right & b_right)), int(np.sum(a_right & ~b_right))
    p = 1.0 if n01 + n10 == 0 else binomtest(min(n01, n10), n01 + n10, 0.5).pvalue
    return n01, n10, float(p)


def check_significance(sdir: Path, rep: dict) -> int:
    """Every per-seed McNemar row of the report against the saved logits; returns the rows checked."""
    checked = 0
    for pair in rep["significance"]:
        logits = {}
        for m in (pair["a"], pair["b"]):
            logits[m] = [np.load(sdir / "final" / m / f"seed-{k}" / "test_logits.npz")
                         for k in range(len(pair["per_seed"]))]
        accs = {m: [float((z["logits"].argmax(1) == z["labels"]).mean()) for z in logits[m]] for m in logits}
        diff = float(np.mean(accs[pair["a"]]) - np.mean(accs[pair["b"]]))
        assert abs(pair["acc_diff"] - diff) < 1e-9, (pair["a"], pair["b"], pair["acc_diff"], diff)
        for k, per in enumerate(pair["per_seed"]):
            za, zb = logits[pair["a"]][k], logits[pair["b"]][k]
            assert np.array_equal(za["labels"], zb["labels"])
            right_a, right_b = za["logits"].argmax(1) == za["labels"], zb["logits"].argmax(1) == zb["labels"]
            n01, n10, p = mcnemar_by_hand(right_a, right_b)
            got = per["mcnemar"]
            assert (got["n01"], got["n10"]) == (n01, n10), (pair["a"], pair["b"], k, got, n01, n10)
            assert abs(got["p_value"] - p) <= 1e-9 * max(1.0, p), (got["p_value"], p)
            checked += 1
    return checked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study")
    ap.add_argument("--out", default=None, help="study output root (default: the study file's `out`)")
    ap.add_argument("--no-kill", action="store_true", help="one uninterrupted process")
    args = ap.parse_args()

    import yaml

    from cifarlab.study.spec import load_study_file

    spec = load_study_file(args.study, args.out)
    sdir = spec.study_dir
    if sdir.exists():
        sys.exit(f"{sdir} exists: give another --out (this script measures a study from its start)")
    cmd = [sys.executable, "-m", "cifarlab", "study", str(Path(args.study).resolve())]
    if args.out:
        cmd += ["--out", str(Path(args.out).resolve())]
    first = spec.models[0].name
    stage2 = sdir / "sweeps" / f"{spec.name}-{first}-stage2"
    logs = [sdir.parent / f"{spec.name}.run{k}.log" for k in (1, 2, 3)]
    sdir.parent.mkdir(parents=True, exist_ok=True)
    walls, kills = [], []
    before: dict[int, float] = {}
    epochs = spec.models[0].final_epochs or yaml.safe_load(Path(spec.models[0].config).read_text())["train"]["epochs"]
    plan = [] if args.no_kill else [
        ("stage 3/6 stage2", "complete", lambda: any(t.state.name == "COMPLETE" for t in trials(stage2))),
        ("stage 5/6 final", f"epoch   2/{epochs}", None)]
    for k, log in enumerate(logs[: len(plan) + 1]):
        t0 = time.perf_counter()
        proc = start(cmd, log)
        if k < len(plan):
            after, then, ready = plan[k]
            killed = run_until(proc, log, after, then, ready)
            if not killed:
                sys.exit(f"the study ended (rc {proc.returncode}) before kill point {k + 1}: see {log}")
            kills.append(after)
            if k == 0:
                before = {t.number: t.value for t in trials(stage2) if t.state.name == "COMPLETE"}
        else:
            proc.wait()
            if proc.returncode != 0:
                sys.exit(f"the study failed (rc {proc.returncode}): see {log}")
        walls.append(round(time.perf_counter() - t0, 1))
        print(f"process {k + 1}: {walls[-1]:.0f} s{' (SIGKILLed during ' + kills[-1] + ')' if k < len(plan) else ''}",
              file=sys.stderr, flush=True)

    # nothing repeated
    repeated = 0
    for p in spec.models:
        for stage, budget in (("stage1", p.stage1_trials), ("stage2", p.stage2_trials)):
            ts = trials(sdir / "sweeps" / f"{spec.name}-{p.name}-{stage}")
            n = sum(t.state.name in ("COMPLETE", "PRUNED") for t in ts)
            if budget is not None and n != budget:
                repeated += abs(n - budget)
                print(f"{p.name} {stage}: {n} counted trials, budget {budget}", file=sys.stderr)
    after = {t.number: t.value for t in trials(stage2) if t.state.name == "COMPLETE"}
    changed = [n for n, v in before.items() if after.get(n) != v]
    repeated += len(changed)
    resumed = sdir / "final" / first / "seed-0" / "metrics.csv"
    rows = [r.split(",")[0] for r in resumed.read_text().strip().splitlines()[1:]]
    epochs_ok = rows == [str(i) for i in range(1, epochs + 1)]

    rep = json.loads((sdir / "report" / "study.json").read_text())
    checked = check_significance(sdir, rep)
    headline = []
    for r in rep["runs"]:
        s = r["spread"]
        acc, loss = s["test_acc"], s["test_loss"]
        r4 = lambda x: None if x is None else round(x, 4)  # noqa: E731
        headline.append({"model": r["run"], "seeds": acc["n"], "test_acc_mean": r4(acc["mean"]),
                         "test_acc_std": r4(acc["std"]), "ci95": [r4(acc["ci_low"]), r4(acc["ci_high"])],
                         "test_loss_mean": r4(loss["mean"])})
    print(f"\n{'model':<10} {'seeds':>5} {'test acc (mean +- std)':>24} {'95% interval':>18} {'test loss':>10}")
    for h in headline:
        f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        print(f"{h['model']:<10} {h['seeds']:>5} {f(h['test_acc_mean']):>15} +- {f(h['test_acc_std'])} "
              f"[{f(h['ci95'][0])}, {f(h['ci95'][1])}] {f(h['test_loss_mean']):>10}")
    for pair in rep["significance"]:
        print(f"{pair['a']} vs {pair['b']}: {pair['verdict']}")
    print(json.dumps({"study": spec.name, "dir": str(sdir), "wall_s": walls, "total_s": round(sum(walls), 1),
                      "kills": kills, "repeated_trials": repeated, "resumed_epochs_once": epochs_ok,
                      "significance_checked": checked, "headline": headline}))
    if repeated or not epochs_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
