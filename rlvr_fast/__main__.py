"""``python -m rlvr_fast`` and ``torchrun -m rlvr_fast``: the command line (``rlvr_fast.cli``), from any folder.

``-m`` puts the current folder first on ``sys.path``. In the clone's root that folder holds our top-level ``kernels/``
(installed as the subpackage ``rlvr_fast.kernels``), which would then shadow the PyPI package ``kernels`` that
transformers >= 5.25 imports when it loads a model class (``cannot import name 'CUDAProperties' from 'kernels'``). So
the clone's root leaves ``sys.path`` here, before anything imports transformers. ``rlvr_fast`` itself is already
imported by then, and its subpackages resolve through the package's own ``__path__`` (and the install's mapping of
``rlvr_fast.kernels``), never through the root.
"""

import os
import sys


def _drop_clone_root() -> None:
    """Remove the folder holding both ``rlvr_fast/`` and the top-level ``kernels/`` from ``sys.path`` (an installed
    copy has no ``kernels/`` beside it: nothing to do), and forget a top-level ``kernels`` imported from it."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        return
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    shadow = sys.modules.get("kernels")
    origin = getattr(shadow, "__file__", None) or ""
    if shadow is not None and os.path.realpath(origin).startswith(root + os.sep):
        del sys.modules["kernels"]  # the next `import kernels` finds the PyPI package


_drop_clone_root()

from rlvr_fast.cli import main  # noqa: E402  (after the sys.path fix: cli's commands import transformers)

sys.exit(main())
