"""minifusion's benchmarks: time, memory and work per scale, and ours beside the reference implementation on
identical weights. `python -m bench --help`; bench/README.md explains each figure and how it is measured."""
