"""mixtral-lite: Mixtral and Mistral with experts offloaded to host memory."""
