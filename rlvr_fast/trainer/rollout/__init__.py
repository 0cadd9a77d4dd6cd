"""The rollout: the problems and their order (``data``), the seeds every random draw derives from (``seeds``), and the
sampling engines behind one interface (``engines``: ``Rollout``, HF ``generate``; ``shared_prefix_sampler``: each
prompt prefilled once, its G samples decoded against that cache)."""
