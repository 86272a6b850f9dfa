"""flexmask inside existing models: :mod:`.hf` (Hugging Face transformers, also ``flexmask.hf``)
and :mod:`.sdpa` (plain PyTorch models that call ``scaled_dot_product_attention``)."""
