"""Hugging Face checkpoints <-> mla-jax, split by concept: DeepseekV2/V3 config.json translation
(hf/config.py), Llama / Qwen2 / Mistral into the baselines (hf/llama.py), the tensor map and its
inverse (hf/tensors.py), the file readers and writer (hf/safetensors.py), load_hf / convert_hf
(hf/load.py), and the export to DeepseekV2/V3, save_hf / export_run (hf/export.py).

Every name is imported on first use (PEP 562), so reading a JSON file does not import JAX, and
`from mla_jax.hf import load_hf` keeps working.
"""

from mla_jax._lazy import lazy_exports

_NAMES = {  # name -> the module that defines it
    **dict.fromkeys(("SUPPORTED_MODEL_TYPES", "model_config_from_hf", "mtp_layer_count"),
                    "mla_jax.hf.config"),
    **dict.fromkeys(("MTP_SHARED", "MTP_TENSORS", "Conversion", "Target", "fuse_expert_tensors",
                     "hf_tensors_from_params", "mtp_entries", "params_from_hf", "shared_copies",
                     "tensor_map", "to_scan_layout"), "mla_jax.hf.tensors"),
    **dict.fromkeys(("LLAMA_MODEL_TYPES", "llama_config_from_hf", "llama_tensor_map"),
                    "mla_jax.hf.llama"),
    **dict.fromkeys(("dequantize_fp8", "dtype_name", "read_json", "read_safetensors",
                     "write_safetensors"), "mla_jax.hf.safetensors"),
    **dict.fromkeys(("convert_hf", "load_hf"), "mla_jax.hf.load"),
    **dict.fromkeys(("deepseek_family", "export_run", "hf_config", "save_hf"),
                    "mla_jax.hf.export"),
}

__all__ = sorted(_NAMES)


__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
