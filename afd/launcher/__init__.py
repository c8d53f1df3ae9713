"""The launcher: a run's Pipeline, its processes' entry points and fork server, signals, results and report files."""
