"""Sample sets: the samplers of the consistency model and the teacher, the set plan, and the search of the intermediate steps."""
