"""Plots of eval: similarity densities per method (random shaded), pre/post image grids, and the known-answer
rank curves."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mucs.io import atomic_path  # noqa: E402


def savefig(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def densities(sims, metrics, methods, out):
    names = list(metrics)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        t = sims[sims.part == "target"]
        lo, hi = np.nanmin(t[name]), np.nanmax(t[name])
        bins = np.linspace(lo, hi + 1e-12, 25)
        for m in methods:
            v = t[t.method == m][name].values
            if m == "random":
                ax.hist(v, bins=bins, density=True, color="0.8", label="random")
            else:
                ax.hist(v, bins=bins, density=True, histtype="step", lw=1.6, label=m)
        ax.set_title(f"{name} (targets)")
        ax.set_xlabel("pre vs post similarity" if metrics[name].higher_is_similar else "pre vs post distance")
    axes[0][0].legend(fontsize=8)
    savefig(fig, out / "densities.png")


def grids(runs, methods, out, controls):
    """Per job: a row of pre images, then a row of post images per method (targets, then controls)."""
    for r in runs:
        n_t = int(r["pre"]["num_attrib"])
        parts = [("targets", slice(0, n_t))] + ([("controls", slice(n_t, None))] if controls else [])
        for part, sl in parts:
            rows = [r["pre"]["images"][sl]] + [r["posts"][m]["samples"]["images"][sl] for m in methods]
            x = torch.cat(rows)
            n = len(rows[0])
            fig, ax = plt.subplots(figsize=(0.5 * n + 1.2, 0.55 * len(rows) + 0.3))
            from torchvision.utils import make_grid
            g = make_grid((x + 1) / 2, nrow=n, padding=1, pad_value=1.0).permute(1, 2, 0).numpy()
            ax.imshow(g.squeeze(), cmap="gray" if g.shape[-1] in (1,) else None, vmin=0, vmax=1)
            ax.set_yticks([(i + 0.5) * g.shape[0] / len(rows) for i in range(len(rows))], ["pre"] + methods)
            ax.set_xticks([])
            ax.set_title(f"{r['job']}: {part}", fontsize=9)
            savefig(fig, out / f"grid_{part}_{r['job']}.png")


def rank_curves(per_target, path):
    """One panel per known-answer case (exact copies, each corruption level, customization): per method the share of
    targets whose answer ranks within the top k, against k (log scale): recall@k for every k at once."""
    cases = list(dict.fromkeys(zip(per_target.kind, per_target.level)))
    fig, axes = plt.subplots(1, len(cases), figsize=(3.0 * len(cases), 2.8), squeeze=False, sharey=True)
    for ax, (kind, level) in zip(axes[0], cases):
        c = per_target[(per_target.kind == kind) & (per_target.level == level)]
        for m, g in c.groupby("method", sort=False):
            k = np.sort(g["rank"].values + 1)
            ax.step(np.r_[1, k], np.r_[0, np.arange(1, len(k) + 1) / len(k)], where="post", lw=1.4, label=m)
        ax.set_xscale("log")
        ax.set_xlim(1, int(c.candidates.max()))
        ax.set_title(kind if kind in ("exact", "custom") else f"{kind} {level:g}", fontsize=9)
        ax.set_xlabel("k (answer within the top k)")
    axes[0][0].set_ylabel("share of targets (recall@k)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    savefig(fig, path)
