"""Feast feature repository: definitions (feature_definitions.py) and the store factory (store.py)."""
