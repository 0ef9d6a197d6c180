from .registry import FAMILIES, get_family
from .spec import FamilySpec

__all__ = ["FAMILIES", "FamilySpec", "get_family"]
