"""MHA / GQA / MQA -> MLA conversion (MHA2MLA's partial RoPE and joint SVD, TransMLA's RoRoPE),
split by concept: which RoPE features keep their rotation (rope_plan.py), the latent's
factorization (latent.py), calibration statistics (calibration.py), and the conversion of a
model and its workdir (convert.py, `mla-jax convert-to-mla`). docs/conversion.md has the math."""

from mla_jax._lazy import lazy_exports

_NAMES = {  # name -> the module that defines it
    **dict.fromkeys(("METHODS", "RopePlan", "plan_rope", "rope_layout"),
                    "mla_jax.conversion.rope_plan"),
    **dict.fromkeys(("Latent", "factor_latent"), "mla_jax.conversion.latent"),
    **dict.fromkeys(("LayerStats", "calibrate", "calibration_tokens"),
                    "mla_jax.conversion.calibration"),
    **dict.fromkeys(("check_source", "convert_params", "convert_to_mla", "report_lines"),
                    "mla_jax.conversion.convert"),
}

__all__ = sorted(_NAMES)


__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
