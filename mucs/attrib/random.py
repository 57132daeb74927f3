"""`random`: the reference every method is compared against; a fixed draw per (job seed, target).
`random2`: a second, independent draw of the same size; random2 against random is the protocol's null
(target and control AUCs should scatter around 0.5 by as much as retraining alone moves them)."""
import torch

from mucs.attrib.base import Method, register


@register("random")
class Random(Method):
    batch_targets = 64
    draw = 0

    def score(self, x, labels, index):
        # torch's CPU generator keeps the seed's low 32 bits: draw 0 stays below 2**31 for seeds < 21,474
        n, base = len(self.ctx.train), self.ctx.seed * 100003 + self.draw * 2 ** 31
        return torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(base + int(t))) for t in index])


@register("random2")
class Random2(Random):
    draw = 1
