"""Registry of raw networks F(x, c_noise, class_labels, augment_labels)."""

NAMES = ("dit", "unet", "diffusers_unet", "diffusers_dit")


def build_net(name, net_kwargs=None, **shape):
    """The network `name` with its config `net_kwargs` at the dataset's `shape` (img_resolution, in_channels,
    out_channels, label_dim, augment_dim)."""
    net_kwargs = dict(net_kwargs or {})
    if name == "dit":
        from mucs.nets.dit import DiT
        return DiT(**shape, **net_kwargs)
    if name == "unet":
        from mucs.nets.unet import SongUNet
        return SongUNet(**shape, **net_kwargs)
    if name in ("diffusers_unet", "diffusers_dit"):  # a diffusers config may name the shape itself: it is checked
        from mucs.diffusers_adapter import build_net as build_diffusers
        return build_diffusers(name, config=net_kwargs, **shape)
    raise ValueError(f"unknown network {name!r}; choose from {list(NAMES)}")
