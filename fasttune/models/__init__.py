from .registry import FAMILIES, get_family, supported_model_types
from .spec import FamilySpec

__all__ = ["FAMILIES", "FamilySpec", "get_family", "supported_model_types"]
