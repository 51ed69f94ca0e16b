"""Long-running jobs with side effects: training loops, batched generation, I/O, progress."""
