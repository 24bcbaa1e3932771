"""The recommendation pipeline as plain code, shared by the API and the precompute flow:
candidates -> light rank -> heavy rank -> policy re-rank."""
