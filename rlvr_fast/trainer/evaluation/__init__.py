"""Held-out evaluation: pass@k with confidence intervals, calibration and format frequency (``held_out``), and the
``rlvr-fast eval`` command (``command``)."""
