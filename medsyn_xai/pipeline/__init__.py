"""Jobs and daemons' building blocks: generation, explanation, the inbox queue."""
