"""The ablation study's logic, apart from any training: which overrides make each of the paper's
rows (Table 4d and the rest), one results row per finished (variant, seed), and the statistics a
study reports — mean ± std over seeds, the paired difference to a reference mode with a 95%
confidence interval (Student's t over the seeds both modes ran with).

``tools/ablation.py`` drives training through ``train_net.py`` and calls these; they need no
detectron2, so CI tests them everywhere (``tests/test_study.py``).

A results row (one line of ``results.jsonl``)::

    {"study": fingerprint, "variant": "both", "mode": "both", "sweep": null | [KEY, VALUE],
     "seed": 0, "config_file": ..., "overrides": [...], "output_dir": ...,
     "metrics": {"segm/AP": ..., "iuq/cross_fa": ..., ...},
     "sec_per_iter": s, "peak_mem_mb": MB, "images_per_iter": n, "iters": N, "wall_s": s,
     "curves": {"iteration": [...], "loss_mask": [...], ...}}
"""
import hashlib
import json
import math
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

def _iuq(inter, equi_mode=None):
    """MODEL.IUQ overrides: IUQ on, ``loss_inter`` on or off, views off (None) or in ``equi_mode``."""
    opts = ["MODEL.IUQ.ENABLED", "True", "MODEL.IUQ.INTER.ENABLED", str(inter),
            "MODEL.IUQ.EQUI.ENABLED", str(equi_mode is not None)]
    return opts + (["MODEL.IUQ.EQUI.MODE", equi_mode] if equi_mode else [])


# The paper's rows (Table 4d, plus L_inter / L_equi alone, Table 3) as MODEL.IUQ overrides.
MODES = OrderedDict(
    baseline=("the base model, IUQ off", ["MODEL.IUQ.ENABLED", "False"]),
    augment=("the views as plain augmented images (Table 4d 'w/ Aug.'): the compute-equal baseline of 'both'",
             _iuq(False, "augment")),
    feature=("feature equivariance only (Table 4d)", _iuq(False, "feature")),
    inter=("L_inter alone (Table 3)", _iuq(True)),
    equi=("L_equi alone (Table 3)", _iuq(False, "full")),
    both=("L_inter + L_equi (the full method)", _iuq(True, "full")),
)
# Compute-matched twins: the views count toward SOLVER.IMS_PER_BATCH (a step holds as many images
# as the baseline's), see MODEL.IUQ.EQUI.VIEWS_IN_BATCH.
for _name in ("augment", "equi", "both"):
    _doc, _opts = MODES[_name]
    MODES[f"{_name}_matched"] = (_doc + "; views within IMS_PER_BATCH (compute-matched)",
                                 _opts + ["MODEL.IUQ.EQUI.VIEWS_IN_BATCH", "True"])

# Columns of the table and of the figure, in order. COCO's segm metrics, then the IUQ measures
# (``iuq.evaluation.measures``); a column is shown when some row has it.
AP_METRICS = ["segm/AP", "segm/AP50", "segm/AP75", "segm/APs", "segm/APm", "segm/APl"]
MEASURE_METRICS = ["iuq/cross_fa", "iuq/cross_fa_frac", "iuq/own_fa", "iuq/own_fa_frac",
                   "iuq/equi_rel_err", "iuq/equi_dice", "iuq/view_dice", "iuq/between_var", "iuq/own_probe"]
CURVES = ["loss_mask", "loss_ins", "loss_inter", "loss_equi", "total_loss"]


@dataclass
class Run:
    """One training run of a study: a variant (a mode, or a mode at one value of a swept key)
    with one seed."""

    variant: str
    mode: str
    seed: int
    overrides: list
    sweep: tuple = None

    @property
    def key(self):
        return f"{self.variant}/seed{self.seed}"


def plan_runs(modes, seeds, sweep=None):
    """The runs of a study, seed-major (every mode of seed 0, then of seed 1, ...), so that a
    study stopped early has complete paired comparisons for the seeds it finished.

    ``sweep``: None, or (KEY, [V1, V2, ...]): every mode at every value of KEY (variants named
    ``mode@KEY=V``)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"Unknown mode(s) {unknown}; known: {list(MODES)}")
    if not seeds:
        raise ValueError("No seeds given")
    runs = []
    for seed in seeds:
        for mode in modes:
            base = list(MODES[mode][1])
            if sweep is None:
                runs.append(Run(mode, mode, int(seed), base))
                continue
            key, values = sweep
            for value in values:
                runs.append(Run(f"{mode}@{key}={value}", mode, int(seed), base + [key, str(value)], (key, str(value))))
    return runs


def config_files(config_file):
    """``config_file`` and the files it inherits from (``_BASE_``, recursively), in that order."""
    import yaml

    files, todo = [], [os.path.abspath(config_file)]
    while todo:
        path = todo.pop(0)
        files.append(path)
        with open(path) as f:
            base = (yaml.safe_load(f) or {}).get("_BASE_")
        if base:
            todo.append(os.path.normpath(os.path.join(os.path.dirname(path), os.path.expanduser(base))))
    return files


def study_fingerprint(config_file, overrides, num_gpus=1):
    """What makes two runs of one variant and seed the same run: the content of the config file
    and of every file it inherits from, the common overrides and the number of processes. Rows of
    another study in the same results file are kept but not counted. (The code is not part of
    it: each row records the commit it ran at.)"""
    h = hashlib.sha1()
    for path in config_files(config_file):
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(json.dumps([list(overrides), int(num_gpus)]).encode())
    return h.hexdigest()[:12]


def load_results(path):
    """Rows of a results.jsonl (a missing file is an empty study; a torn last line, from a
    process killed while writing, is skipped)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_result(path, row):
    """Append one row and flush it to disk (a study may be killed at any time)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def done_keys(rows, fingerprint):
    return {f"{r['variant']}/seed{r['seed']}" for r in rows if r.get("study") == fingerprint}


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def t_quantile(p, dof):
    """Student's t quantile (scipy's)."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def mean_std(values):
    """(mean, sample std) of a list; std is nan for fewer than two values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n < 2:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def paired_difference(a, b, confidence=0.95):
    """Paired difference ``a - b`` over the seeds both have: dicts seed -> value. Returns
    (mean, half-width of the two-sided ``confidence`` interval, n); half-width nan when n < 2."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    n = len(diffs)
    m, sd = mean_std(diffs)
    if n < 2:
        return m, math.nan, n
    return m, t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n), n


def masks_alive(row, floor=0.05, dead_dice=0.99, tail=5):
    """Whether a run ended with live masks (True), with every mask off (False: the dead-mask
    failure, docs/study.md), or None when its row says neither. Read from the last training
    reading of the own-instance probability ``iuq/own_mask_p`` (IUQ runs: dead below ``floor``),
    else from the base dice loss ``loss_mask`` (CondInst's, in [0, 1]: dead when the median of its
    last ``tail`` logged values is ``dead_dice`` or more, i.e. no mask fires anywhere)."""
    p = value_of(row, "iuq/own_mask_p")
    if p is not None:
        return p >= floor
    curve = [v for v in (row.get("curves") or {}).get("loss_mask", []) if v is not None][-tail:]
    if not curve:
        return None
    return _median(curve) < dead_dice


def modes_alive(rows, modes, seeds):
    """``modes`` less those whose (unswept) runs at every one of ``seeds`` ended dead
    (``masks_alive`` False): the stopping rule of a study that stops running a mode which kills
    training. A mode missing a seed, or whose death cannot be judged, is kept."""
    keep = []
    for mode in modes:
        verdicts = {int(r["seed"]): masks_alive(r) for r in rows if r["variant"] == mode}
        if not all(verdicts.get(int(s)) is False for s in seeds):
            keep.append(mode)
    return keep


@dataclass
class VariantSummary:
    variant: str
    mode: str
    seeds: list
    stats: dict = field(default_factory=dict)  # metric -> (mean, std)
    diffs: dict = field(default_factory=dict)  # (reference, metric) -> (mean, half-width, n)
    alive: tuple = (0, 0)  # (runs whose masks lived, runs ``masks_alive`` could judge)


def summarise(rows, fingerprint=None, references=("baseline", "augment"), metrics=None, diff_metrics=("segm/AP",)):
    """Per variant (in the order first seen): mean and std over seeds of each metric, and its
    paired difference to each reference *mode* (for a swept variant, the reference at the same
    swept value when there is one, else the plain reference)."""
    if fingerprint is not None:
        rows = [r for r in rows if r.get("study") == fingerprint]
    metrics = metrics or [m for m in AP_METRICS + MEASURE_METRICS + ["sec_per_iter", "peak_mem_mb", "images_per_iter"]
                          if any(value_of(r, m) is not None for r in rows)]
    by_variant = OrderedDict()
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    per_seed = {v: defaultdict(dict) for v in by_variant}
    for v, rs in by_variant.items():
        for r in rs:
            for m in metrics:
                x = value_of(r, m)
                if x is not None:
                    per_seed[v][m][int(r["seed"])] = x
    out = []
    for v, rs in by_variant.items():
        s = VariantSummary(v, rs[0]["mode"], sorted({int(r["seed"]) for r in rs}))
        judged = [a for a in (masks_alive(r) for r in rs) if a is not None]
        s.alive = (sum(judged), len(judged))
        for m in metrics:
            s.stats[m] = mean_std(list(per_seed[v][m].values()))
        for ref in references:
            ref_variant = _reference_variant(v, rs[0], ref, by_variant)
            if ref_variant is None or ref_variant == v:
                continue
            for m in diff_metrics:
                s.diffs[(ref, m)] = paired_difference(per_seed[v][m], per_seed[ref_variant][m])
        out.append(s)
    return out


def _reference_variant(variant, row, ref_mode, by_variant):
    sweep = row.get("sweep")
    if sweep:
        candidate = f"{ref_mode}@{sweep[0]}={sweep[1]}"
        if candidate in by_variant:
            return candidate
    return ref_mode if ref_mode in by_variant else None


def value_of(row, metric):
    """A row's value of ``metric``: a top-level number (sec_per_iter, peak_mem_mb) or an
    evaluation metric; None when absent or not finite."""
    x = row.get(metric, row.get("metrics", {}).get(metric))
    if isinstance(x, (int, float)) and math.isfinite(x):
        return float(x)
    return None


def _fmt(mean, std, digits):
    if mean is None or not math.isfinite(mean):
        return "-"
    if std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _fmt_diff(d):
    mean, half, n = d
    if not math.isfinite(mean):
        return "-"
    if not math.isfinite(half):
        return f"{mean:+.2f} (n={n})"
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def format_table(summaries, references=("baseline", "augment"), metrics=None, diffs=True):
    """The study's table as text (tabulate's "pipe" format, so it pastes into a README):
    mean ± std over seeds of ``metrics`` (default: every metric some variant has); with
    ``diffs``, 'Δ AP vs ref': the paired difference in segm AP with its 95% CI, and 'alive': the
    runs whose masks lived out of those judged (``masks_alive``; a dead run counts at its AP)."""
    from tabulate import tabulate

    if metrics is None:
        metrics = []
        for s in summaries:
            metrics += [m for m in s.stats if m not in metrics and math.isfinite(s.stats[m][0])]
    headers = ["variant", "seeds"] + [_short(m) for m in metrics]
    alive = diffs and any(s.alive[1] for s in summaries)
    headers += ["alive"] if alive else []
    headers += [f"Δ AP vs {r} [95% CI]" for r in references] if diffs else []
    table = []
    for s in summaries:
        row = [s.variant, len(s.seeds)]
        for m in metrics:
            mean, std = s.stats.get(m, (math.nan, math.nan))
            digits = 3 if m.startswith("iuq/") or m == "sec_per_iter" else (0 if m in ("peak_mem_mb", "images_per_iter") else 2)
            row.append(_fmt(mean, std, digits))
        if alive:
            row.append(f"{s.alive[0]}/{s.alive[1]}" if s.alive[1] else "-")
        for ref in references if diffs else ():
            d = s.diffs.get((ref, "segm/AP"))
            row.append(_fmt_diff(d) if d else "")
        table.append(row)
    return tabulate(table, headers=headers, tablefmt="pipe", disable_numparse=True)


def format_tables(summaries, references=("baseline", "augment")):
    """Two tables: COCO segm AP with the paired differences; then the IUQ measures and the cost
    per iteration (seconds, peak memory, images a step holds)."""
    present = {m for s in summaries for m in s.stats if math.isfinite(s.stats[m][0])}
    ap = format_table(summaries, references, [m for m in AP_METRICS if m in present])
    rest = [m for m in MEASURE_METRICS + ["sec_per_iter", "peak_mem_mb", "images_per_iter"] if m in present]
    return ap + "\n\n" + format_table(summaries, references, rest, diffs=False) if rest else ap


def _short(metric):
    return {"sec_per_iter": "s/iter", "peak_mem_mb": "peak MB", "images_per_iter": "images/iter"}.get(
        metric, metric.split("/", 1)[-1])


# ----------------------------------------------------------------------------------------------
# Reading a finished run (detectron2's OUTPUT_DIR/metrics.json)
# ----------------------------------------------------------------------------------------------


def read_run(output_dir, warmup_fraction=0.1):
    """From a finished run's ``metrics.json`` (detectron2's JSONWriter): the last evaluation's
    metrics, the median seconds per iteration past the first ``warmup_fraction`` of training,
    the peak memory (``peak_mem_mb``, logged by IUQTrainer), and the loss curves."""
    entries = _metrics_entries(output_dir)
    metrics, times, peaks, curves = {}, [], [], defaultdict(list)
    last_iter = _last_training_iteration(entries)
    for e in entries:
        for k, v in e.items():
            if k.startswith(("segm/", "bbox/", "iuq/")):
                metrics[k] = v
        if "time" in e and e.get("iteration", 0) >= warmup_fraction * last_iter:
            times.append(e["time"])
        if "peak_mem_mb" in e:
            peaks.append(e["peak_mem_mb"])
        if any(k in e for k in CURVES):
            curves["iteration"].append(e.get("iteration"))
            for k in CURVES:
                curves[k].append(e.get(k))
    curves = {k: v for k, v in curves.items() if any(x is not None for x in v)}
    return {
        "metrics": metrics,
        "sec_per_iter": _median(times),
        "peak_mem_mb": max(peaks) if peaks else None,
        "iters": last_iter + 1,
        "curves": curves,
    }


def pilot_evaluations(output_dir, metric="segm/AP"):
    """[(iterations trained, value)] of every evaluation in a run's ``metrics.json`` (a pilot
    with ``TEST.EVAL_PERIOD``): detectron2 writes a periodic evaluation after iteration i (0-based)
    at ``iteration`` i, so i + 1 iterations had trained, and the final one one past the last
    training iteration."""
    entries = _metrics_entries(output_dir)
    last = _last_training_iteration(entries)
    evals = {}
    for e in entries:
        if isinstance(e.get(metric), (int, float)):
            i = int(e["iteration"])
            evals[(min(i, last) if last >= 0 else i) + 1] = float(e[metric])
    return sorted(evals.items())


def _metrics_entries(output_dir):
    """The lines of a run's ``metrics.json`` (detectron2's JSONWriter), a torn one skipped."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: the run did not write metrics")
    entries = []
    with open(path) as f:
        for line in f:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return entries


def _last_training_iteration(entries):
    """The last training iteration logged (-1 for none); the final evaluation is written one past
    it, at MAX_ITER."""
    return max((e.get("iteration", 0) for e in entries if "time" in e or "total_loss" in e), default=-1)


def schedule_from_pilot(evaluations, rel_gain=0.1, cap=None, floor=2.0):
    """The schedule rule of the studies' protocol: N = the first evaluation whose gain over the
    previous one is below ``rel_gain`` of its value (the baseline has levelled off), else the
    last evaluation (or ``cap``, the CPU budget's, when given and the pilot reached it). An
    evaluation below ``floor`` AP never counts as levelled (docs/study.md, Amendment 2): there
    the run-to-run noise is of the order of the value, and a drop is noise, not a plateau.
    ``evaluations``: [(iterations, AP)] in order. Returns N."""
    if not evaluations:
        raise ValueError("The pilot has no evaluation: train it with TEST.EVAL_PERIOD set")
    levelled = (it for (_, prev), (it, ap) in zip(evaluations, evaluations[1:])
                if ap >= floor and ap - prev < rel_gain * ap)
    n = next(levelled, evaluations[-1][0])
    return n if cap is None else min(n, cap)


def _median(values):
    if not values:
        return None
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# ----------------------------------------------------------------------------------------------
# The figure
# ----------------------------------------------------------------------------------------------


def plot_study(rows, summaries, path, fingerprint=None):
    """``path`` (PNG): left, segm AP per variant (mean, error bar = std over seeds, dots = seeds);
    right, the training curves per variant (mean over seeds) of the base mask loss, loss_inter and
    loss_equi."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if fingerprint is not None:
        rows = [r for r in rows if r.get("study") == fingerprint]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    ax = axes[0]
    names = [s.variant for s in summaries]
    for i, s in enumerate(summaries):
        mean, std = s.stats.get("segm/AP", (math.nan, math.nan))
        ax.bar(i, mean, yerr=std if math.isfinite(std) else None, capsize=4, color=f"C{i % 10}", alpha=0.6)
        seeds = [value_of(r, "segm/AP") for r in rows if r["variant"] == s.variant]
        ax.plot([i] * len(seeds), seeds, "k.", ms=5)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("segm AP")
    ax.set_title("segm AP (bar: mean ± std; dots: seeds)")
    panels = [("base mask loss", ("loss_mask", "loss_ins")), ("loss_inter", ("loss_inter",)), ("loss_equi", ("loss_equi",))]
    for ax, (title, keys) in zip(axes[1:], panels):
        for i, s in enumerate(summaries):
            xs, ys = _mean_curve([r for r in rows if r["variant"] == s.variant], keys)
            if xs:
                ax.plot(xs, ys, color=f"C{i % 10}", label=s.variant)
        ax.set_title(title + " (mean over seeds)")
        ax.set_xlabel("iteration")
        if title == "base mask loss":
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _mean_curve(rows, keys):
    acc = defaultdict(list)
    for r in rows:
        c = r.get("curves") or {}
        key = next((k for k in keys if k in c), None)
        if key is None:
            continue
        for it, v in zip(c["iteration"], c[key]):
            if v is not None:
                acc[it].append(v)
    xs = sorted(acc)
    return xs, [sum(acc[x]) / len(acc[x]) for x in xs]
