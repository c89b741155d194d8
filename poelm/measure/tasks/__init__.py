"""lm-evaluation-harness tasks shipped with poelm (``poelm eval``)."""
