"""Registry of raw networks F(x, c_noise, class_labels, augment_labels)."""


def build_net(name, **kwargs):
    if name == "dit":
        from mucs.nets.dit import DiT
        return DiT(**kwargs)
    if name == "unet":
        from mucs.nets.unet import SongUNet
        return SongUNet(**kwargs)
    raise ValueError(f"unknown network {name!r}; choose from ['dit', 'unet']")
