"""leanlm: efficient LLMs."""
