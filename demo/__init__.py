"""Demo data: MovieLens-100K read from the recbole wheel and published through the real API."""
