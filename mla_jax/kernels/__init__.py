"""Pallas kernels (TPU: Mosaic; GPU: Triton), each behind the signature of the XLA function it
replaces, tested against it in interpret mode on CPU and lowered for TPU and GPU in the tests.

  mla_decode.py        MLA decode (FlashMLA-style): mla_decode_partials and
                       paged_mla_decode_partials, as layers/flash_decode.py and
                       layers/paged_attention.py; model.decode_kernel chooses them
  mla_decode_block.py  one latent block's scores, online softmax and weighted sum
  mla_decode_tpu.py    the Mosaic kernel; mla_decode_gpu.py the Triton one

Nothing is imported here, so importing one kernel does not import Pallas' other backends.
"""
