"""Query-based black-box attacks, all through the Oracle."""
