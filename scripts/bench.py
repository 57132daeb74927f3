#!/usr/bin/env python
"""Benchmark MUCS attribution against the machine's limit and against a straightforward loop.

    python scripts/bench.py [--quick] [--parts peak,digits,cifar] [--targets N] [--rounds R] [--compile]
                            [--device cpu] [--out DIR] [--keep DIR] [key=value ... (overrides of the digits job)]

In one run it measures: the fp32 matmul peak (best 2048^3 matmul); every stage of the digits job and of a
CIFAR-sized configuration on synthetic data (pipeline.py subprocesses in a temporary logs folder: wall and CPU
seconds, peak memory from os.wait4); on the CIFAR-sized job the `a` stage of the --methods too (default ekfac and
journey_trak), with what their logs say per target (ekfac: the factor fitting's and scoring's seconds and peak
memory); MUCS seconds per target; the loss-evaluation throughput ((training item x
noise) pairs per second) and its GFLOP/s (FLOPs per pair from FlopCounterMode) as a fraction of the peak; and the
same attribution through a straightforward loop in the published code's style (see `straightforward_scores`),
with the per-target speed-up and the Spearman correlation of the two score vectors.

The machine may be shared: every ratio is measured within this run with what is compared interleaved and
repeated (the fraction of peak pairs each evaluation round with a peak measurement right before it), and
medians are reported. Writes bench.json and bench.md to pointer_to/plots/bench/ (or --out).
"""
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from mucs.attrib.mucs import MUCS, LossEvaluator, item_noise_losses
from mucs.cli import Parser, guard
from mucs.config import REPO, compose, num_removal, post_dir, pre_dir
from mucs.data import write_dataset
from mucs.diffusion import per_sample_loss
from mucs.errors import UserError
from mucs.io import write_json, write_text
from mucs.model import build_denoiser
from mucs.stages import ORDER, Job, attrib_context, targets_of
from mucs.validate import check_device

PIPELINE = REPO / "pipeline.py"


# ---------------------------------------------------------------------------------------------
# measuring


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu"):
    """(seconds, result) of fn()."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def matmul_peak(device, n=2048, reps=5, dtype=torch.float32):
    """The matmul peak in GFLOP/s (fp32 by default; bf16 on CUDA): the best of `reps` n^3 matmuls after a warm-up."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return max(2 * n ** 3 / timed(lambda: a @ b, device)[0] for _ in range(reps)) / 1e9


def count_flops(fn, *args):
    """FLOPs of fn(*args) as torch.utils.flop_counter counts them (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def run_stage(argv, log):
    """Run a command as a subprocess: wall and CPU seconds, and its peak resident memory (os.wait4)."""
    with open(log, "ab") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: take the stage down with the bench
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = Path(log).read_text(errors="replace").strip().splitlines()[-5:]
        raise UserError(f"{' '.join(map(str, argv[1:4]))} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return dict(wall_s=round(wall, 2), cpu_s=round(ru.ru_utime + ru.ru_stime, 2), peak_mb=round(ru.ru_maxrss / 1024))


def pipeline_stages(over, log):
    """Each of the five stages of one job (Hydra overrides `over`) as its own pipeline.py process."""
    return {st: run_stage([sys.executable, str(PIPELINE), f"--what={st}", *over], log) for st in ORDER}


def method_stages(over, methods, log):
    """The `a` stage of each method as its own pipeline.py process on the job `over` (tpre and gpre done): wall and
    CPU seconds, peak memory, and the first target's row of the method's log."""
    out = {}
    for m in methods:
        o = list(over) + [f"attrib={m}"]
        out[m] = run_stage([sys.executable, str(PIPELINE), "--what=a", *o], log)
        rows = (post_dir(compose(o)) / "attrib_log.jsonl").read_text().splitlines()
        out[m]["log"] = json.loads(rows[0])
    return out


# ---------------------------------------------------------------------------------------------
# the baseline: one target the straightforward way


def straightforward_losses(D, X, labels, sigmas, E, batch):
    """L[j, m] in the published code's style: per batch of items (the training batch size), every noise in
    turn, the model called once per noise batch, under torch.no_grad."""
    L = torch.empty(len(X), len(sigmas))
    with torch.no_grad():
        for i in range(0, len(X), batch):
            x = X[i: i + batch]
            lab = None if labels is None else labels[i: i + batch]
            for m in range(len(sigmas)):
                L[i: i + len(x), m] = per_sample_loss(D, x, sigmas[m].expand(len(x)), E[m].expand_as(x), lab).cpu()
    return L


def straightforward_scores(m, x_g, y_g, t):
    """Scores of one target with nothing reused: the same unlearning (MUCS.unlearn, same seeds), then L_orig and
    L_unl both recomputed by straightforward_losses, then the same skew."""
    batch = int(m.ctx.cfg.train.batch)
    D_u, info = m.unlearn(x_g, y_g, t)
    L_orig = straightforward_losses(m.ctx.D, m.X, m.labels, m.sigmas, m.E, batch)
    L_unl = straightforward_losses(D_u, m.X, m.labels, m.sigmas, m.E, batch)
    return m.skew(L_unl, L_orig), info


def compare(m, x, labels, index, num_attrib, device):
    """Per target, MUCS.score and straightforward_scores, in alternating order: seconds, speed-up, Spearman.
    MUCS's time includes its share of the once-per-job L_orig (its seconds / the job's num_attrib)."""
    m.prepare()
    t_orig, _ = timed(lambda: m.losses(m.ctx.D, m.sigmas, m.E), device)
    rows = []
    for k, t in enumerate(index):
        x_g = x[t: t + 1].to(device)
        y_g = None if labels is None else labels[t: t + 1].to(device)
        runs = {}
        for which in (("fast", "base") if k % 2 == 0 else ("base", "fast")):
            if which == "fast":
                runs[which] = timed(lambda: m.score(x_g, y_g, torch.tensor([t])), device)
            else:
                runs[which] = timed(lambda: straightforward_scores(m, x_g, y_g, t), device)
        (s_fast, (sf, info)), (s_base, (sb, _)) = runs["fast"], runs["base"]
        fast = s_fast + t_orig / num_attrib
        constant = sf[0].std() == 0 or sb.std() == 0  # nothing unlearned: no ranking to compare
        rho = None if constant else round(float(spearmanr(sf[0].numpy(), sb.numpy()).statistic), 6)
        rows.append(dict(target=t, fast_s=round(fast, 2), base_s=round(s_base, 2), speedup=round(s_base / fast, 2),
                         spearman=rho, max_abs_diff=float((sf[0] - sb).abs().max()),
                         unlearn_steps=info[0]["steps"]))
    return dict(L_orig_s=round(t_orig, 2), num_attrib=num_attrib, targets=rows,
                speedup=round(statistics.median(r["speedup"] for r in rows), 2),
                spearman_min=min((r["spearman"] for r in rows if r["spearman"] is not None), default=None))


def adaptive_compare(m, x, labels, index, device):
    """Per target, exact MUCS and attrib.adaptive (interleaved; both run the same seeded unlearning): unlearning
    and evaluation seconds, forward passes of the evaluation, the items evaluated on each pass, and the recall of
    the exact top num_removal by the adaptive top num_removal."""
    m.prepare()
    ma = MUCS(OmegaConf.merge(m.cfg, {"adaptive": True}), m.ctx)
    ma.__dict__.update({k: v for k, v in vars(m).items() if k != "cfg"})  # the prepared job-wide quantities
    k = num_removal(m.ctx.cfg)
    top = lambda s: set(torch.argsort(s, descending=True, stable=True)[:k].tolist())  # noqa: E731
    rows = []
    for i, t in enumerate(index):
        x_g, y_g = x[t: t + 1].to(device), None if labels is None else labels[t: t + 1].to(device)
        out = {}
        for which in (("exact", "adaptive") if i % 2 == 0 else ("adaptive", "exact")):
            s, info = (m if which == "exact" else ma).score(x_g, y_g, torch.tensor([t]))
            out[which] = (s[0], info[0])
        (se, ie), (sa, ia) = out["exact"], out["adaptive"]
        rows.append(dict(target=t, unlearn_s=ie["unlearn_s"], exact_eval_s=ie["eval_s"], adaptive_eval_s=ia["eval_s"],
                         exact_passes=ie["forward_passes"], adaptive_passes=ia["forward_passes"],
                         recall=len(top(se) & top(sa)) / k, evaluated=ia["evaluated"]))
    med = lambda f: round(statistics.median(f(r) for r in rows), 2)  # noqa: E731
    return dict(k=k, items=len(m.X), noises=len(m.sigmas), blocks=int(ma.cfg.adaptive_blocks), targets=rows,
                recall_min=min(r["recall"] for r in rows), recall_mean=round(statistics.mean(r["recall"] for r in rows), 4),
                passes_ratio=med(lambda r: r["exact_passes"] / r["adaptive_passes"]),
                eval_time_ratio=med(lambda r: r["exact_eval_s"] / max(r["adaptive_eval_s"], 1e-9)))


def bf16_agreement(m, x, labels, index, device):
    """CUDA only: MUCS with the loss evaluation in bf16 (attrib.eval_autocast=bf16) against fp32, per target: the
    Spearman correlation of the two score vectors and the overlap of their top num_removal; evaluation seconds;
    the bf16 and fp32 matmul peaks and the run's peak GPU memory."""
    m.prepare()
    mb = MUCS(OmegaConf.merge(m.cfg, {"eval_autocast": "bf16"}), m.ctx)
    mb.__dict__.update({k: v for k, v in vars(m).items() if k not in ("cfg", "evaluator")})
    mb.evaluator = LossEvaluator(m.ctx.D, mb.cfg, device)
    k, rows = num_removal(m.ctx.cfg), []
    torch.cuda.reset_peak_memory_stats()
    for t in index:
        x_g, y_g = x[t: t + 1].to(device), None if labels is None else labels[t: t + 1].to(device)
        (s32, i32), (s16, i16) = m.score(x_g, y_g, torch.tensor([t])), mb.score(x_g, y_g, torch.tensor([t]))
        top = lambda s: set(torch.argsort(s[0], descending=True, stable=True)[:k].tolist())  # noqa: E731
        rows.append(dict(target=t, spearman=round(float(spearmanr(s32[0].numpy(), s16[0].numpy()).statistic), 4),
                         topk_overlap=len(top(s32) & top(s16)) / k, fp32_eval_s=i32[0]["eval_s"], bf16_eval_s=i16[0]["eval_s"]))
    return dict(targets=rows, peak_memory_mb=round(torch.cuda.max_memory_allocated() / 2 ** 20),
                peak_fp32_gflops=round(matmul_peak(device), 1),
                peak_bf16_gflops=round(matmul_peak(device, dtype=torch.bfloat16), 1))


def adaptive_projection(a, n=50_000, M=100):
    """Evaluation forward passes per target at the published CIFAR-10 scale (n items x M noises) under the same
    pruning schedule: the fractions of items evaluated on each pass as measured (medians over targets), the
    noises split into the same number of strided blocks, the last pass taking every remaining noise."""
    passes = max(len(r["evaluated"]) for r in a["targets"])
    frac = [statistics.median((r["evaluated"] + [0] * passes)[b] / a["items"] for r in a["targets"]) for b in range(passes)]
    size = [len(range(b, M, a["blocks"])) for b in range(a["blocks"])]
    total = sum(n * f * (sum(size[b:]) if b == passes - 1 else size[b]) for b, f in enumerate(frac))
    return dict(fractions=[round(f, 4) for f in frac], passes=round(total), exact_passes=n * M, ratio=round(n * M / total, 2))


def throughput(m, device, rounds, pairs, compile=False):
    """Loss-evaluation throughput of the pre model over `pairs` (item, noise) pairs, each round right after a
    peak measurement: pairs/s, GFLOP/s and fraction of peak (medians over rounds; with `compile`, also the
    attrib.compile evaluator's rounds, interleaved, and its compile seconds: first pass minus a steady one)."""
    m.prepare()
    n = max(1, min(len(m.X), pairs // len(m.sigmas)))
    X, lab = m.X[:n], None if m.labels is None else m.labels[:n]
    fpp = count_flops(lambda: item_noise_losses(m.ctx.D, X[:1], None if lab is None else lab[:1], m.sigmas[:1],
                                                m.E[:1], 1))
    evals = {"eager": lambda: item_noise_losses(m.ctx.D, X, lab, m.sigmas, m.E, m.eval_batch)}
    out = dict(flops_per_pair=fpp, pairs=n * len(m.sigmas), eval_batch=m.eval_batch)
    if compile:
        loss = LossEvaluator(m.ctx.D, OmegaConf.merge(m.cfg, {"compile": True}), device).bind(m.ctx.D)
        evals["compiled"] = lambda: item_noise_losses(m.ctx.D, X, lab, m.sigmas, m.E, m.eval_batch, loss)
        first = timed(evals["compiled"], device)[0]  # compiles
    evals["eager"]()  # warm-up
    rates = {k: [] for k in evals}
    for r in range(rounds):
        peak = matmul_peak(device, reps=3)
        for k in (list(evals) if r % 2 == 0 else list(evals)[::-1]):
            rate = n * len(m.sigmas) / timed(evals[k], device)[0]
            rates[k].append((rate, rate * fpp / 1e9 / peak, peak))
    for k, v in rates.items():
        out[k] = dict(pairs=n * len(m.sigmas), pairs_per_s=round(statistics.median(r[0] for r in v), 1),
                      gflops=round(statistics.median(r[0] * fpp / 1e9 for r in v), 2),
                      frac_peak=round(statistics.median(r[1] for r in v), 3),
                      frac_peak_best=round(max(r[1] for r in v), 3),
                      peak_gflops=round(statistics.median(r[2] for r in v), 1))
    if compile:
        out["compile_s"] = round(first - out["compiled"]["pairs"] / out["compiled"]["pairs_per_s"], 1)
        out["compile_speedup"] = round(statistics.median(c[0] / e[0] for c, e in zip(rates["compiled"], rates["eager"])), 3)
    return out


# ---------------------------------------------------------------------------------------------
# the two configurations


def paths(root):
    return [f"paths.{k}={root}/{k}" for k in ("logs", "data", "plots", "cache")]


def digits_overrides(args, root, quick):
    over = ["job=digits_dit_edm", "attrib=mucs", "seed=1", f"device={args.device}", *paths(root)]
    if quick:
        over += ["train.steps=40", "num_attrib=2", "subsample=400", "attrib.max_steps=10"]  # barely trained: cap unlearning
    return over + args.overrides


def adopt_pre(pre, over):
    """Copy a finished pre run folder of this job (--pre) to where the job `over` expects its own."""
    cfg = compose(over)
    if not (Path(pre) / "model-best.safetensors").exists() or not (Path(pre) / "samples.safetensors").exists():
        raise UserError(f"--pre {pre} is not a finished pre run folder (tpre and gpre); run them first")
    shutil.copytree(pre, pre_dir(cfg), dirs_exist_ok=True)


def synthetic_cifar(folder, n_train, n_test, seed=0):
    """CIFAR-shaped random data (32x32 RGB uint8, unconditional) in the stored format: timing needs no download."""
    g = np.random.default_rng(seed)
    img = lambda n: g.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    write_dataset(folder, dict(name="synthetic32", num_classes=0, cond="none"),
                  dict(train=dict(images=img(n_train), ids=np.arange(n_train)),
                       test=dict(images=img(n_test), ids=np.arange(n_test))))


def cifar_overrides(args, root):
    """A CIFAR-sized DiT-EDM (32x32x3, patch 2, 32 extra tokens, width args.cifar_width, depth 4) on synthetic
    data, with short training and sampling at a high lr (the adaLN-zero gates must open for the MLP weights that
    unlearning updates to matter); unlearning runs a fixed number of steps at the training lr (L_null set so it
    never stops early: the barely trained model would otherwise stop at once)."""
    q = args.quick
    root.mkdir(parents=True, exist_ok=True)
    synthetic_cifar(root / "synthetic32", 64 if q else 256, 16)
    w = args.cifar_width
    return ["job=cifar10_dit_edm", "attrib=mucs", "seed=1", f"device={args.device}", *paths(root),
            "data.name=synthetic32", f"data.folder={root}/synthetic32", "data.num_removal_base=2",
            f"model.net_kwargs.width={w}", "model.net_kwargs.depth=4", f"model.net_kwargs.heads={w // 64}",
            f"model.net_kwargs.cond_width={w}", f"train.steps={4 if q else 20}", "train.batch=16",
            "train.lr=2e-3", "train.epoch_steps=1000", "train.warmup_steps=1", "train.val_items=16", "num_attrib=2",
            "control_factor=1", f"sample.num_steps={4 if q else 8}", "sample.surplus=1",
            f"attrib.num_noises={4 if q else 8}", "attrib.L_null=1000", "attrib.lr_factor=1", f"attrib.max_steps={2 if q else 5}",
            f"attrib.eval_batch={args.cifar_eval_batch}"]


def attribution(over, args):
    """In this process, on the job `over` whose tpre and gpre are done: MUCS against the straightforward loop,
    and the loss-evaluation throughput against the peak."""
    job = Job(compose(over))
    ctx = attrib_context(job)
    m = MUCS(job.cfg.attrib, ctx)
    x, labels = targets_of(job)
    index = list(range(min(args.targets, len(x))))
    res = dict(compare=compare(m, x, labels, index, int(job.cfg.num_attrib), job.device))
    res["adaptive"] = adaptive_compare(m, x, labels, list(range(min(args.adaptive_targets, len(x)))), job.device)
    if torch.device(job.device).type == "cuda":
        res["bf16"] = bf16_agreement(m, x, labels, index, job.device)
    res["throughput"] = throughput(m, job.device, args.rounds, (2 if args.quick else 4) * m.eval_batch, args.compile)
    res["mucs_s_per_target"] = statistics.median(r["fast_s"] for r in res["compare"]["targets"])
    res["train_items"], res["num_noises"] = len(ctx.train), int(job.cfg.attrib.num_noises)
    return res


def paper_scale(res):
    """What one target of the published CIFAR-10 job costs at the achieved GFLOP/s of the CIFAR-sized run: FLOPs
    per pair of the published ~100 M-parameter DiT (counted on the meta device) x 50,000 items x 100 noises."""
    cfg = compose(["job=cifar10_dit_edm"])
    D = build_denoiser(cfg.model, dict(resolution=32, channels=3, num_classes=10, cond="none"), device="meta")
    x, s = torch.zeros(1, 3, 32, 32, device="meta"), torch.ones(1, device="meta")
    fpp = count_flops(lambda: per_sample_loss(D, x, s, x))
    total = fpp * 50_000 * 100
    out = dict(flops_per_pair=fpp, flops_per_target=total)
    if "digits" in res["configs"]:
        out["adaptive"] = adaptive_projection(res["configs"]["digits"]["adaptive"])
        out["adaptive"]["flops_per_target"] = fpp * out["adaptive"]["passes"]
    if "cifar" in res["configs"]:
        out["cpu_hours_per_target"] = round(total / (res["configs"]["cifar"]["throughput"]["eager"]["gflops"] * 1e9) / 3600, 1)
    return out


# ---------------------------------------------------------------------------------------------
# report


def table(res):
    lines = [f"# bench ({res['when']}, {res['machine']})", ""]
    if "peak_gflops" in res:
        lines += [f"fp32 matmul peak (best 2048^3): {res['peak_gflops']:.1f} GFLOP/s", ""]
    for name, r in res.get("configs", {}).items():
        c, t = r["compare"], r["throughput"]
        lines += [f"## {name}: {r['train_items']} training items x {r['num_noises']} noises", "",
                  "| stage | wall s | CPU s | peak MB |", "|---|---|---|---|"]
        lines += [f"| {st} | {v['wall_s']} | {v['cpu_s']} | {v['peak_mb']} |" for st, v in r["stages"].items()]
        lines += [f"| a ({m}) | {v['wall_s']} | {v['cpu_s']} | {v['peak_mb']} |" for m, v in r.get("methods", {}).items()]
        for m, v in r.get("methods", {}).items():
            g = v["log"]
            lines += ["", f"{m} per target: {g['seconds']} s" + (
                f"; factors ({g['strategy']}, {g['fit_pairs']:,} pairs) {g['fit_s']} s, peak {g['fit_peak_mb']} MB; "
                f"scoring {g['score_s']} s per target, peak {g['score_peak_mb']} MB" if "fit_s" in g else "")]
        if "pre" in r:
            lines += ["", f"attribution below on the pre model of {r['pre']} (the full job), not on the stages above"]
        lines += ["", f"MUCS per target: {r['mucs_s_per_target']:.1f} s (L_orig once per job: {c['L_orig_s']} s, "
                  f"counted as 1/{c['num_attrib']} per target)", "",
                  "| target | MUCS s | straightforward s | speed-up | Spearman | unlearning steps |", "|---|---|---|---|---|---|"]
        lines += [f"| {row['target']} | {row['fast_s']} | {row['base_s']} | {row['speedup']}x | {row['spearman']} | "
                  f"{row['unlearn_steps']} |" for row in c["targets"]]
        lines += ["", f"loss evaluation: {t['flops_per_pair'] / 1e6:.1f} MFLOP per pair, eval_batch {t['eval_batch']}", "",
                  "| path | pairs/s | GFLOP/s | fraction of peak (median) | best round |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {t[k]['pairs_per_s']} | {t[k]['gflops']} | {t[k]['frac_peak']:.0%} | {t[k]['frac_peak_best']:.0%} |"
                  for k in ("eager", "compiled") if k in t]
        if "compile_s" in t:
            lines += ["", f"torch.compile: {t['compile_s']} s to compile, {t['compile_speedup']}x the eager throughput"]
        if "bf16" in r:
            b = r["bf16"]
            tf = t["eager"]["gflops"] / 1e3
            lines += ["", f"CUDA: {tf:.2f} TFLOP/s achieved in fp32 evaluation = {tf * 1e3 / b['peak_fp32_gflops']:.0%} of the "
                      f"fp32 matmul peak ({b['peak_fp32_gflops'] / 1e3:.1f} TFLOP/s) and {tf * 1e3 / b['peak_bf16_gflops']:.0%} "
                      f"of the bf16 peak ({b['peak_bf16_gflops'] / 1e3:.1f}); peak memory {b['peak_memory_mb']} MB", "",
                      "| target | Spearman bf16 vs fp32 | top-k overlap | fp32 eval s | bf16 eval s |", "|---|---|---|---|---|"]
            lines += [f"| {x['target']} | {x['spearman']} | {x['topk_overlap']:.3f} | {x['fp32_eval_s']} | {x['bf16_eval_s']} |"
                      for x in b["targets"]]
        a = r["adaptive"]
        lines += ["", f"adaptive evaluation (attrib.adaptive, {a['blocks']} blocks) against exact, top {a['k']} of "
                  f"{a['items']} items x {a['noises']} noises: recall min {a['recall_min']:.3f} (mean "
                  f"{a['recall_mean']:.3f}), {a['passes_ratio']}x fewer forward passes, {a['eval_time_ratio']}x less "
                  f"evaluation time (medians)", "",
                  "| target | unlearning s | exact eval s | adaptive eval s | exact passes | adaptive passes | recall | items per pass |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x['target']} | {x['unlearn_s']} | {x['exact_eval_s']} | {x['adaptive_eval_s']} | {x['exact_passes']} | "
                  f"{x['adaptive_passes']} | {x['recall']:.3f} | {', '.join(map(str, x['evaluated']))} |" for x in a["targets"]]
        lines += [""]
    ps = res.get("paper_scale")
    if ps:
        lines += [f"published CIFAR-10 DiT-EDM: {ps['flops_per_pair'] / 1e9:.1f} GFLOP per pair, "
                  f"{ps['flops_per_target'] / 1e15:.0f} PFLOP per target (50,000 items x 100 noises)"
                  + (f", about {ps['cpu_hours_per_target']} h on this CPU at the CIFAR-sized run's rate"
                     if "cpu_hours_per_target" in ps else ""), ""]
        if "adaptive" in ps:
            a = ps["adaptive"]
            lines += [f"adaptive at that scale (the digits pruning schedule: items per pass {a['fractions']} of all): "
                      f"{a['passes']:,} forward passes per target instead of {a['exact_passes']:,} ({a['ratio']}x fewer), "
                      f"{a['flops_per_target'] / 1e15:.0f} PFLOP", ""]
    return "\n".join(lines)


def main(argv):
    p = Parser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short training, a subsampled digits job, tiny CIFAR run")
    p.add_argument("--parts", default="peak,digits,cifar", help="comma-separated: peak, digits, cifar")
    p.add_argument("--targets", type=int, help="targets compared against the straightforward loop (default 2; quick 1)")
    p.add_argument("--rounds", type=int, help="interleaved throughput rounds (default 5; quick 2)")
    p.add_argument("--adaptive_targets", type=int, default=20, help="targets of the exact vs adaptive comparison "
                   "(at most num_attrib; default 20)")
    p.add_argument("--compile", action="store_true", help="also measure attrib.compile (eager vs compiled, interleaved)")
    p.add_argument("--cifar_width", type=int, default=256)
    p.add_argument("--cifar_eval_batch", default="auto")
    p.add_argument("--methods", default="ekfac,journey_trak", help="methods whose `a` stage is timed on the "
                   "CIFAR-sized job (comma-separated; empty: none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads here and in the stages (default: torch's own choice)")
    p.add_argument("--pre", type=Path, help="a finished pre run folder of the full digits job (tpre, gpre) to attribute "
                   "on instead of the bench's own, e.g. to measure the real job while its stages run --quick")
    p.add_argument("--out", type=Path, help="output folder (default pointer_to/plots/bench)")
    p.add_argument("--keep", type=Path, help="run folder to keep (default: a temporary one, removed)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the digits job")
    args = p.parse_args(argv)
    for key in ("targets", "rounds", "threads", "cifar_width"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UserError(f"--{key}={getattr(args, key)} is not allowed: it must be an integer >= 1")
    check_device(args.device, "--device")
    compose(digits_overrides(args, Path("/nonexistent"), args.quick))  # the job's settings, checked before any work
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        compose([f"attrib={m}"])  # an unknown method is refused before any work
    if args.threads:  # this process, and the stages through the environment they inherit
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    args.targets = args.targets or (1 if args.quick else 2)
    args.rounds = args.rounds or (2 if args.quick else 5)
    parts = set(args.parts.split(","))
    if parts - {"peak", "digits", "cifar"}:
        raise UserError(f"unknown --parts {sorted(parts - {'peak', 'digits', 'cifar'})}; choose from peak, digits, cifar")
    out = args.out or Path(compose([]).paths.plots) / "bench"
    res = dict(when=time.strftime("%Y-%m-%d %H:%M"), quick=args.quick, torch=torch.__version__,
               threads=torch.get_num_threads(), machine=f"{os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, "
               f"load {os.getloadavg()[0]:.1f}, {args.device}", configs={})
    with tempfile.TemporaryDirectory(prefix="mucs-bench-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if "peak" in parts:
            res["peak_gflops"] = round(matmul_peak(args.device), 1)
            print(f"[bench] fp32 matmul peak {res['peak_gflops']} GFLOP/s", flush=True)
        if "digits" in parts:
            print("[bench] digits: stages ...", flush=True)
            over = digits_overrides(args, root / "digits", args.quick)
            res["configs"]["digits"] = r = dict(stages=pipeline_stages(over, root / "digits.log"))
            if args.pre:  # attribute on a given pre model of the full job instead of the bench's (quick) one
                over = digits_overrides(args, root / "digits-pre", quick=False)
                adopt_pre(args.pre, over)
                r["pre"] = str(args.pre)
            print("[bench] digits: attribution ...", flush=True)
            r.update(attribution(over, args))
        if "cifar" in parts:
            print("[bench] cifar-sized: stages ...", flush=True)
            over = cifar_overrides(args, root / "cifar")
            res["configs"]["cifar"] = r = dict(stages=pipeline_stages(over, root / "cifar.log"))
            if methods:
                print(f"[bench] cifar-sized: a of {', '.join(methods)} ...", flush=True)
                job = [o for o in over if not o.startswith("attrib")]  # without MUCS's settings
                r["methods"] = method_stages(job, methods, root / "cifar.log")
            print("[bench] cifar-sized: attribution ...", flush=True)
            r.update(attribution(over, args))
    res["paper_scale"] = paper_scale(res)
    res["bench_peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    text = table(res)
    write_json(out / "bench.json", res)
    write_text(out / "bench.md", text + "\n")
    print(text)
    print(f"[bench] wrote {out / 'bench.json'} and {out / 'bench.md'}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench stops its running stage too
    sys.exit(guard(main)())
