"""mucs: training-data attribution for diffusion models. The Python API (mucs.api) is importable from here:
mucs.load, mucs.attribute, mucs.run, mucs.counterfactual, mucs.evaluate, mucs.report; errors a user can fix are mucs.UserError."""
from mucs.errors import UserError

_API = ("Denoiser", "Scores", "load", "attribute", "run", "counterfactual", "evaluate", "report")
__all__ = ["UserError", *_API]


def __getattr__(name):  # the API imports torch and the methods: only when it is used
    if name in _API:
        from mucs import api
        return getattr(api, name)
    raise AttributeError(f"module 'mucs' has no attribute {name!r}")
