"""Session-wide fixtures for the expensive real things. Package-specific fixtures live in
tests/<package>/conftest.py."""
