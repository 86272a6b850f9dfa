"""Lowering: from mask and bias expressions to a :class:`~flexmask.lowering.plan.Plan`.

* :mod:`.layout`: the vocabulary (shapes of a call, block ranges, the per-call lowering context).
* :mod:`.dense`: evaluating a mask function on a dense grid, a slab of rows at a time.
* :mod:`.blocks`: ``(any, all)`` block maps of a mask → a FlexAttention ``BlockMask``.
* :mod:`.prefix_topk` and :mod:`.selection`: the exact prefix top-k behind content masks.
* :mod:`.token_layout`: the key layout that lets flex skip unselected keys of ``fm.topk``.
* :mod:`.graphs`: replaying mask builds from CUDA graphs.
* :mod:`.cache`: the one cache (lowered masks, captured graphs, compiled functions).
* :mod:`.planner`: chooses the backend and builds the plan.

Nothing here names a mask type: expressions declare what their lowering offers
(:class:`~flexmask.lowering.layout.Offers`) and the planner chooses.
"""
