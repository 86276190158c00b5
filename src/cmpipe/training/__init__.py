"""The training loop, its averaged weights (the target and the evaluation EMAs) and their choice, and the teacher-trajectory cache it reads."""
