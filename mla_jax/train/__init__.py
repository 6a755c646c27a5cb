"""`mla-jax train`, split by concept: the train step and Trainer (train/step.py), the loop
(train/loop.py), the checks made before any work (train/checks.py), the memory pre-check
(train/memory.py), the corpus and batches (train/data.py) and the metrics files
(train/metrics.py).

Every name is imported on first use (PEP 562), so `from mla_jax.train.data import batch_at`
imports no optimizer. Restoring a workdir's parameters is mla_jax.workdir's, which imports no
training code; its names stay reachable here for code written against the single module.
"""

from mla_jax._lazy import lazy_exports

_NAMES = {  # name -> the module that defines it
    **dict.fromkeys(("NEVER_APPLY_NONFINITE", "TrainState", "Trainer", "TrainingError",
                     "apply_gradients", "compute_grads", "loss_fn", "make_optimizer"),
                    "mla_jax.train.step"),
    **dict.fromkeys(("sample_text", "train"), "mla_jax.train.loop"),
    "check_inputs": "mla_jax.train.checks",
    **dict.fromkeys(("check_memory", "step_memory"), "mla_jax.train.memory"),
    **dict.fromkeys(("device_memory_available", "host_memory_available"),
                    "mla_jax.device_memory"),
    **dict.fromkeys(("TRAIN_STREAM", "VAL_STREAM", "Corpus", "batch_at", "load_corpus",
                     "unigram_entropy"), "mla_jax.train.data"),
    **dict.fromkeys(("MetricsLog", "plot_losses", "read_metrics"), "mla_jax.train.metrics"),
    **dict.fromkeys(("check_workdir", "load_checkpoint", "load_trained", "read_workdir_config"),
                    "mla_jax.workdir"),
    "Transformer": "mla_jax.model",  # the model the step trains, as the single module named it
}

__all__ = sorted(_NAMES)


__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
