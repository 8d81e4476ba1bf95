"""Exit tuning: the exit losses and what trains the exits."""
