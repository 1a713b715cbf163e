"""sinai: inference-time noise defenses against query-based black-box attacks."""
