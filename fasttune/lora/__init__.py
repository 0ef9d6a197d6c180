from .inject import inject_lora, linear_layer_names, resolve_target_modules

__all__ = ["inject_lora", "linear_layer_names", "resolve_target_modules"]
