"""Zero-shot editing as the edit stage runs it: the tasks, their baselines and scores."""
