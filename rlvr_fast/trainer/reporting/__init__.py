"""What a run records: metrics.jsonl and the progress line (``log``), where a step's seconds go (``step_timer``), and
the summary at the end: the before/after table, plots and report.md (``report``)."""
