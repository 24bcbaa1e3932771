"""The serving layer: the FastAPI app and the recommendation pipeline as plain code."""
