"""`random`: the reference every method is compared against; a fixed draw per (job seed, target)."""
import torch

from mucs.attrib.base import Method, register


@register("random")
class Random(Method):
    batch_targets = 64

    def score(self, x, labels, index):
        n = len(self.ctx.train)
        return torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(self.ctx.seed * 100003 + int(t)))
                            for t in index])
