"""Benchmarks: each prints its figures and saves JSON under bench/results/ (`python -m bench`)."""
