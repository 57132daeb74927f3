"""`clip`: nearest training items by CLIP ViT-L-14 (laion2b_s32b_b82k) image-embedding cosine similarity."""
from mucs.attrib.base import register
from mucs.attrib.common import EmbeddingSimilarity


@register("clip")
class CLIP(EmbeddingSimilarity):
    embedder = "clip"
