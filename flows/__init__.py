"""Bytewax dataflows: one module per flow, each exposing ``build_flow(settings, io=None)``."""
