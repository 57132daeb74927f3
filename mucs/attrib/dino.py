"""`dino`: nearest training items by DINOv2 ViT-B/14 image-embedding cosine similarity."""
from mucs.attrib.base import register
from mucs.attrib.common import EmbeddingSimilarity


@register("dino")
class DINO(EmbeddingSimilarity):
    embedder = "dinov2"
