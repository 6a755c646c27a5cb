"""Serving: many requests at fixed memory over a paged latent cache.

Engine (engine.py) is continuous batching with chunked prefill, prefix sharing and preemption;
the page bookkeeping is pages.py, the device programs runner.py, the request types requests.py.
`mla-jax serve` (server.py, with background.py driving the engine) is an OpenAI-compatible HTTP
server over it (the optional "serve" extra). docs/serving.md has the guide.
"""

from mla_jax._lazy import lazy_exports

_PUBLIC = {
    "Engine": "mla_jax.serving.engine", "SamplingParams": "mla_jax.serving.requests",
    "Completion": "mla_jax.serving.requests", "RequestOutput": "mla_jax.serving.requests",
    "InvalidRequest": "mla_jax.serving.requests",
    "PagePool": "mla_jax.serving.pages", "OutOfPages": "mla_jax.serving.pages",
}

__all__ = sorted(_PUBLIC)

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
