"""Scale-out benchmarks: the real engine actors run for a fixed time (runner.py), the parameter
server's capacity against model size and wire precision (ps_capacity.py), the scaling model that
turns both into worker-count limits (model.py), and the table and plots (report.py, plots.py)."""
