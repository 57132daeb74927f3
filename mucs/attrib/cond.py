"""`cond`: training items with the target's condition: cosine of the condition vectors, i.e. label equality
for one-hot classes and caption-embedding cosine for text. Ties (all items of the class) are broken by a
small seeded random term, so removal picks random items of the class rather than the lowest ids."""
import torch
import torch.nn.functional as F_

from mucs.attrib.base import Method, register
from mucs.errors import UserError
from mucs.model import labels_of


@register("cond")
class Cond(Method):
    batch_targets = 64

    @classmethod
    def missing(cls, cfg):
        if not cfg.model.conditional:
            return "it needs a conditional model (model.conditional=true)"

    def prepare(self):
        Y = labels_of(self.ctx.train, self.ctx.cfg.model, self.ctx.meta)
        if Y is None:
            raise UserError("attribution 'cond' needs a conditional model (model.conditional=true on a dataset "
                            "with classes or captions); this job is unconditional")
        self.Y = F_.normalize(Y.float(), dim=1)

    def score(self, x, labels, index):
        if labels is None:
            raise UserError("attribution 'cond' needs the targets' conditions; user targets (targets=...) have none: "
                            "attribute gpre's samples instead")
        s = F_.normalize(labels.float().cpu(), dim=1) @ self.Y.T
        # a draw of its own per target, independent of `random`'s
        gens = [torch.Generator().manual_seed((self.ctx.seed * 100003 + int(t)) * 31 + 7) for t in index]
        jitter = torch.stack([torch.rand(len(self.Y), generator=g) for g in gens])
        return s + float(self.cfg.tie_break) * jitter
