"""`sscd`: nearest training items by SSCD copy-detection (sscd_disc_mixup) image-embedding cosine similarity."""
from mucs.attrib.base import register
from mucs.attrib.common import EmbeddingSimilarity


@register("sscd")
class SSCD(EmbeddingSimilarity):
    embedder = "sscd"
