"""Trajectory processing of all-wrong groups (``RLVRConfig.trajectory_processing``): successes kept as demonstrations
(``store``, replayed off-policy with LUFFY's shaped weight, ``weights``), failures turned into lessons (``lessons``),
the modes and their controls (``modes``), and the step's rebuild of its groups (``processor``)."""
