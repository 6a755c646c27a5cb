"""mla-jax's configuration, split by concept: the model schema (config/model.py), the run config
and its id (config/run.py), the YAML loader, overrides and presets (config/loader.py).

Every name is imported on first use (PEP 562), so `from mla_jax.config import ModelConfig`
imports the schema alone, not PyYAML or the loader.
"""

from mla_jax._lazy import lazy_exports

_NAMES = {  # name -> the module that defines it
    **dict.fromkeys(("ATTENTION_KINDS", "CACHE_DTYPES", "DTYPES", "MOE_IMPLS", "ModelConfig",
                     "YarnScaling", "yarn_get_mscale"), "mla_jax.config.model"),
    **dict.fromkeys(("REMAT_POLICIES", "Config", "DataConfig", "MeshConfig", "TrainConfig",
                     "differing_fields"), "mla_jax.config.run"),
    **dict.fromkeys(("DEFAULT_NAME", "PRESETS_DIR", "config_from_dict", "config_keys",
                     "load_config", "load_config_args", "parse_yaml", "presets", "read_yaml",
                     "resolve_config_path"), "mla_jax.config.loader"),
}

__all__ = sorted(_NAMES)


__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
