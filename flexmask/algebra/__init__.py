"""The algebra: typed masks (``&``, ``|``, ``~``), biases (``+``) and content masks (top-k).

Expressions are immutable values: they hold their constructor data and nothing else. What they
mean at token level (``_mask_mod``/``_term``) and at block level (``_classify``), and what their
lowering offers, they say to :mod:`flexmask.lowering`, which builds plans from them.
"""
