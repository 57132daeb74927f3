"""`das`: Diffusion Attribution Score (Lin et al. 2024), the variant of the authors' released code.

DAS compares the predicted distributions with and without a training item instead of their losses: removing
item j moves the parameters by a Newton step ~ (Phi^T Phi)^{-1} J_j^T r_j, which scales the item's output
gradient by its residual r_j, and changes the target's noise prediction through the target's own output
gradient. In the released code (Jinxu-Lin/DAS: `2_grad.py` output type `das`, `07_score.py` method `DAS1`)
this is D-TRAK's score with two changes, both here:
  - the output function is the mean absolute noise prediction, mean |eps_theta| (`output: l1`), and
  - each training item's score is multiplied by its residual r_j, from its fixed-noise denoising errors
    e_jk = ||eps_hat - eps||_rms at the K levels: `released` r_j = mean_k e_jk / ||e_j||_2 (as in the code),
    `rms` r_j = sqrt(mean_k e_jk^2) (the residual's magnitude in the derivation), or `none`.
`square: true` squares the score (the KL between the two Gaussian predictions is a squared norm).
"""
import torch

from mucs.attrib.base import register
from mucs.attrib.dtrak import DTRAK
from mucs.attrib.common import job_cache
from mucs.attrib.mucs import item_noise_losses
from mucs.errors import UserError
from mucs.io import digest


@register("das")
class DAS(DTRAK):
    def prepare(self):
        if hasattr(self, "r"):
            return
        super().prepare()
        ctx, cfg = self.ctx, self.cfg
        L = job_cache(ctx, "das-losses", dict(noise=digest(self.sigmas, self.E)), lambda: item_noise_losses(
            ctx.D, self.X, self.labels, self.sigmas, self.E, int(cfg.eval_batch)))
        s = self.sigmas.cpu()
        e = (L / (ctx.D.loss_weight(s) * s ** 2)).sqrt()  # rms of eps_hat - eps = (x - D) / sigma, per level
        if cfg.residual == "released":
            self.r = (e / (e.norm(dim=1, keepdim=True) + 1e-8)).mean(1)
        elif cfg.residual == "rms":
            self.r = e.square().mean(1).sqrt()
        elif cfg.residual == "none":
            self.r = torch.ones(len(e))
        else:
            raise UserError(f"attrib.residual must be released, rms or none, not {cfg.residual!r}")

    def score(self, x, labels, index):
        s = super().score(x, labels, index) * self.r
        return s.square() if self.cfg.square else s
