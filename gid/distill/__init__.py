"""General Instance Distillation: GISM, the feature/relation/response losses, the Distiller."""

from gid.distill.distiller import Distiller

__all__ = ["Distiller"]
