"""Training: AdamW with warm-up, EMA, validation loss, best/last checkpoints, early stop, resume.

Every random draw of step k comes from a generator seeded with (seed, k), and the data order from
(seed, epoch): a run resumed from its newest state file sees exactly the noise and order of an
uninterrupted run, so their weights agree bit for bit on the same machine. With several data-parallel
processes (mucs.distributed) every rank draws the same global batch and keeps its own rows.
"""
import csv
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mucs.diffusion import per_sample_loss
from mucs.distributed import World, data_parallel
from mucs.errors import UserError
from mucs.io import torch_load, torch_save, write_text
from mucs.model import build_denoiser, clone, export_diffusers, labels_of, load_weights, save_weights
from mucs.precision import autocast, numerics

STATE = "train-state.pt"


def step_generator(seed, step, stream=0):
    """A generator for draw `stream` of step `step`: a fixed mix of the integers, the same on every machine."""
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + int(step) * 0x85EBCA77 + stream * 0xC2B2AE3D) % 2 ** 63)


class Order:
    """Batches drawn without replacement from per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, n, batch, seed):
        self.n, self.batch, self.seed, self._perm = n, batch, seed, (None, None)

    def perm(self, epoch):
        if self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=step_generator(self.seed, epoch, stream=1)))
        return self._perm[1]

    def __call__(self, step):
        start, out = step * self.batch, []
        while sum(len(o) for o in out) < self.batch:
            epoch, off = divmod(start, self.n)
            take = self.perm(epoch)[off: off + self.batch - sum(len(o) for o in out)]
            out.append(take)
            start += len(take)
        return torch.cat(out)


def make_augment(model_cfg, train_cfg):
    if not model_cfg.augment_dim or not train_cfg.augment_p:
        return None
    from mucs.augment import AugmentPipe
    return AugmentPipe(p=train_cfg.augment_p)


def train_batch(D, split, meta, model_cfg, train_cfg, idx, g, device, augment=None):
    """The pieces of one training batch, all random draws from generator g: (y, sigma, eps, labels, aug)."""
    sub = split.subset(idx)
    y = sub.float_images()
    aug = None
    if augment is not None:
        y, aug = augment(y, generator=g)
    caption = None
    if meta["cond"] == "text" and sub.conds_count is not None:
        caption = (torch.rand(len(sub), generator=g) * sub.conds_count).long()
    labels = labels_of(sub, model_cfg, meta, caption)
    if labels is not None and train_cfg.cond_dropout > 0:  # for classifier-free guidance
        keep = (torch.rand(len(sub), generator=g) >= train_cfg.cond_dropout).float()
        labels = labels * keep[:, None]
    sigma = D.train_sigma(len(sub), generator=g)
    eps = torch.randn(y.shape, generator=g)
    to = lambda t: None if t is None else t.to(device)
    return to(y), to(sigma), to(eps), to(labels), to(aug)


@torch.no_grad()
def validation_loss(D, split, meta, model_cfg, seed, device, n_items=512, batch=256, world=World()):
    """Mean EDM loss on a fixed subset of held-out items with fixed noise: comparable across evaluations.
    Data-parallel ranks share each batch's rows and sum their totals."""
    g = torch.Generator().manual_seed(seed + 12345)
    n = min(n_items, len(split))
    idx = torch.randperm(len(split), generator=g)[:n]
    total = 0.0
    for i in range(0, n, batch):
        sub = split.subset(idx[i: i + batch])
        y = sub.float_images()
        sigma, eps = D.train_sigma(len(sub), generator=g), torch.randn(y.shape, generator=g)
        labels = labels_of(sub, model_cfg, meta)
        if world.size > 1:
            r = world.rows(len(sub))
            y, sigma, eps, labels = y[r], sigma[r], eps[r], None if labels is None else labels[r]
            if len(y) == 0:  # fewer items than processes in this batch (its draws are made above)
                continue
        loss = per_sample_loss(D, y.to(device), sigma.to(device), eps.to(device),
                               None if labels is None else labels.to(device))
        total += loss.sum().item()
    return world.sum(total) / n


def run_key(cfg, split, device, init=None):
    """What a training state belongs to: the model and recipe settings, the seed, the training items, the numerics
    it trains under and the initial weights (a fine-tune's)."""
    from mucs.config import hash_settings, sections
    from mucs.io import file_hash
    key = dict(sections(cfg, "model", "train", "seed"), ids=split.ids.tolist(),
               numerics=numerics(device, cfg.precision.autocast))
    if init is not None:
        key["init"] = file_hash(init)
    return hash_settings(key)


def lr_at(step, cfg):
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def train(cfg, split, val_split, meta, out_dir, device="cpu", desc="train", world=World(), init=None):
    """Train a denoiser on `split`; write model-best/-last.safetensors (EMA weights) and train_log.csv
    into out_dir (and, for diffusers backbones, the best weights as a diffusers pipeline in out_dir/diffusers).
    `init`: a weights file to start from (a fine-tune) instead of the seeded initialisation. Resumes from
    out_dir/train-state.pt when present. In a world of several processes each takes its rows of every global
    batch; only rank 0 writes."""
    tc, mc, out_dir = cfg.train, cfg.model, Path(out_dir)
    if len(split) == 0:
        raise UserError("the training set is empty; check --subsample and the removal size")
    if tc.batch < world.size:
        raise UserError(f"train.batch {tc.batch} is smaller than the {world.size} data-parallel processes; "
                        f"raise train.batch or start fewer processes")
    torch.manual_seed(cfg.seed)  # initial weights
    D = build_denoiser(mc, meta)
    if init is not None:
        load_weights(init, D, what="initial weights")
    D = D.to(device).train()
    ema = clone(D).eval().requires_grad_(False)
    opt = torch.optim.AdamW(D.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.get("beta1", 0.9), 0.999),
                            eps=1e-8)
    step, best, since_best, log, running = 0, math.inf, 0, [], []
    state_path, key = out_dir / STATE, run_key(cfg, split, device, init)
    if state_path.exists():
        st = torch_load(state_path, what="training state", hint="rerun the training stage")
        if not isinstance(st, dict) or st.get("key", key) != key:
            raise UserError(f"{state_path} is the state of another training run (other settings, training items or "
                            f"numerics: device, precision); rerun with --force to start over")
        try:
            D.load_state_dict(st["model"])
            ema.load_state_dict(st["ema"])
            opt.load_state_dict(st["opt"])
            step, best, since_best, log = st["step"], st["best"], st["since_best"], st["log"]
            running = st.get("running", [])  # losses since the last log row, so the log resumes identically
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise UserError(f"{state_path} does not fit this model ({e.__class__.__name__}); rerun with --force to "
                            f"start over")
        if st.get("stopped"):
            print(f"[{desc}] already finished ({st['stopped']}) at step {step}")
            if world.main:
                write_log(out_dir / "train_log.csv", log)  # in case a kill came between the two
                if not (out_dir / "diffusers").exists():
                    export(mc, meta, out_dir, desc)
            return dict(steps=step, best_val=best, stopped=st["stopped"])
        print(f"[{desc}] resuming from {state_path} at step {step}")
    order, augment = Order(len(split), tc.batch, cfg.seed), make_augment(mc, tc)
    split_dev = split  # uint8 stays on CPU; batches are made on CPU so the noise does not depend on the device
    # an augment embedder without augmentation gets no gradient, which DDP must be told
    ddp = data_parallel(D, device, find_unused=bool(mc.augment_dim) and augment is None) if world.size > 1 else None

    def save_state(stopped=""):
        if world.main:
            torch_save(state_path, dict(model=D.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                                        best=best, since_best=since_best, log=log, stopped=stopped, key=key,
                                        running=running))

    bar = tqdm(total=tc.steps, initial=step, desc=desc, unit="step", dynamic_ncols=True, mininterval=2,
               disable=not world.main)
    t0 = time.time()
    stopped = "max steps"
    while step < tc.steps:
        g = step_generator(cfg.seed, step)
        torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=g)) + world.rank)  # dropout draws
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        if ddp is None:
            y, sigma, eps, labels, aug = train_batch(D, split_dev, meta, mc, tc, order(step), g, device, augment)
            with autocast(device, cfg.precision.autocast):
                loss = objective = per_sample_loss(D, y, sigma, eps, labels, aug).mean()
        else:  # the global batch on CPU, this rank's rows on its device
            parts = train_batch(D, split_dev, meta, mc, tc, order(step), g, "cpu", augment)
            r = world.rows(tc.batch)
            with autocast(device, cfg.precision.autocast):
                L = ddp(*[None if t is None else t[r].to(device) for t in parts])
            # DDP averages gradients over ranks: each rank's sum scaled by size / batch gives the global mean
            objective = L.sum() * (world.size / tc.batch)
            loss = torch.tensor(world.sum(L.detach().sum().item()) / tc.batch)
        if not torch.isfinite(loss):
            raise UserError(f"training loss became {loss.item()} at step {step}; lower train.lr or check the data "
                            f"(the last good state is {state_path})")
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
        with torch.no_grad():  # EMA of the weights, per optimizer step
            for p_ema, p in zip(ema.parameters(), D.parameters()):
                p_ema.lerp_(p, 1 - tc.ema)
        step += 1
        running.append(loss.item())
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(running) / len(running):.4f}", img_s=f"{step * tc.batch / (time.time() - t0 + 1e-9):.0f}")
        if step % tc.epoch_steps == 0 or step == tc.steps:
            val = validation_loss(ema, val_split, meta, mc, cfg.seed, device, tc.val_items, world=world)
            log.append(dict(step=step, train_loss=sum(running) / len(running), val_loss=val, lr=lr_at(step - 1, tc)))
            running = []
            if val < best:
                best, since_best = val, 0
                if world.main:
                    save_weights(out_dir / "model-best.safetensors", ema, dict(step=step, val_loss=val))
            else:
                since_best += 1
            if world.main:
                save_weights(out_dir / "model-last.safetensors", ema, dict(step=step, val_loss=val))
            save_state()
            if since_best >= tc.patience:
                stopped = f"early stop: {since_best} epochs without validation improvement"
                break
        elif step % tc.ckpt_every == 0:
            save_state()
    bar.close()
    save_state(stopped)
    if world.main:
        write_log(out_dir / "train_log.csv", log)
        print(f"[{desc}] {stopped} at step {step}; best val loss {best:.4f}; weights in {out_dir}")
        export(mc, meta, out_dir, desc)
    return dict(steps=step, best_val=best, stopped=stopped)


def export(model_cfg, meta, out_dir, desc):
    folder = export_diffusers(model_cfg, meta, Path(out_dir) / "model-best.safetensors", Path(out_dir) / "diffusers")
    if folder:
        print(f"[{desc}] diffusers pipeline of the best EMA weights in {folder}")


def write_log(path, rows):
    if not rows:
        return
    from io import StringIO
    buf = StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())
