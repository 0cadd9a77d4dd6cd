"""What several test modules share: task files, tiny run configs and models, checkpoint faults, the gloo world, the
one-step data-parallel cases, the TRL parity harness, the tiny study plan and the vLLM engine tests' model.

Imported as ``from helpers.<module> import ...``: the top-level ``tests/conftest.py`` has no ``__init__.py`` beside it,
so pytest's default ("prepend") import mode puts ``tests/`` on ``sys.path`` before any test module loads, and processes
spawned by ``helpers.gloo_world`` inherit that ``sys.path``. Test modules never import one another; what two of them
need lives here, once.

Test file names are unique across ``tests/`` and its area folders: each area folder (``tests/ops``, ...) has no
``__init__.py`` either, so its modules are imported by their bare names.
"""
