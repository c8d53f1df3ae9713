"""The launcher: a run's Pipeline, the processes it forks (entry points, fork server), signals, results, report files."""
