"""`denoised_nn`: the worked example of docs/adding-a-method.md, a method in one file.

Nearest training items in the space of the pre model's own denoised estimates: every image, target or training
item, gets the same fixed noise at level `sigma`, and its feature is what the model makes of it, D(x + sigma eps,
sigma). Identical images get identical features, so a training image attributed as a target ranks itself first.

To use it, copy this file to mucs/attrib/denoised_nn.py and denoised_nn.yaml to configs/attrib/denoised_nn.yaml.
"""
import torch

from mucs.attrib.base import Method, register


@register("denoised_nn")
class DenoisedNN(Method):
    batch_targets = 64  # targets per score() call

    @torch.no_grad()
    def features(self, x):
        """D(x + sigma eps, sigma) of images x [N, C, H, W] in [-1, 1], flattened to [N, C*H*W]; one eps for all."""
        cfg, ctx = self.cfg, self.ctx
        eps = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(cfg.noise_seed)))
        out = []
        for batch in x.split(int(cfg.batch)):
            sigma = torch.full((len(batch),), float(cfg.sigma), device=ctx.device)
            noisy = (batch + float(cfg.sigma) * eps).to(ctx.device)
            out.append(ctx.D(noisy, sigma).flatten(1).float().cpu())  # no labels: the unconditional estimate
        return torch.cat(out)

    def prepare(self):
        self.train_features = self.features(self.ctx.train.float_images())  # once per process

    def score(self, x, labels, index):
        return -torch.cdist(self.features(x), self.train_features).square()  # [targets, n_train], higher = closer
