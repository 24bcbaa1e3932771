"""How the stack starts: the embedded local stack, topic bootstrap, deployment files."""
