"""`pixel`: nearest training items in pixel space (negative squared distance or cosine)."""
import torch
import torch.nn.functional as F_

from mucs.attrib.base import Method, register


@register("pixel")
class Pixel(Method):
    batch_targets = 64

    def prepare(self):
        self.X = self.ctx.train.float_images().flatten(1)

    def score(self, x, labels, index):
        x = x.flatten(1).float()
        if self.cfg.distance == "cosine":
            return F_.normalize(x, dim=1) @ F_.normalize(self.X, dim=1).T
        return -torch.cdist(x, self.X).square()
