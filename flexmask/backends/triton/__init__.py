"""Triton kernels (CUDA) behind the ``key_bias`` backend: :mod:`.key_mass` (the query-side sum of
the bias gradient) and :mod:`.fused_bwd` (one backward for dq, dk, dv and the bias)."""
