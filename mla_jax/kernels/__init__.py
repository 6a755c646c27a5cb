"""Pallas kernels (TPU: Mosaic; GPU: Triton), each behind the signature of the JAX function it
replaces, tested against it in interpret mode on CPU and lowered for TPU and GPU in the tests.

  flash_attention.py      flash attention for training and prefill (layers/flash_attention.py
                          chooses it by platform): the custom VJP, the layout, the padding
  flash_attention_tpu.py  its Mosaic kernels; flash_attention_gpu.py its Triton kernels

Nothing is imported here, so importing one kernel does not import Pallas' other backends.
"""
