"""Triton kernels, each beside its plain-PyTorch reference (`X` and `X_ref` in `X.py`):
w4a16 (weight-only int2/3/4/8 matmul), kv_write / paged_attention / prefill_attention (the paged
KV cache, fp16 or kv_quant.py's int8/int4 format), rmsnorm, rotary, activation. Nothing here
imports lowbit.models, lowbit.quant or lowbit.engine. Off the GPU the kernels run only under
Triton's interpreter (TRITON_INTERPRET=1 before the first kernel import; see testing.py)."""
