"""PyTorch (and numpy) replays of linmix's CUDA kernels: each module replays one kernel family, named after its
source in csrc/ (replays/selective_scan.py: csrc/selective_scan/), with one function per kernel or
direction named as the kernel is without its linmix_<op>_ prefix (fwd, bwd, fwd_warp, bwd_tiled). A replay
computes what its kernel computes in the kernel's order: the same tiles, phases and reductions, every block of
a grid dimension at once. The test of the kernel's op runs the replay against the float64 reference on the CPU,
where CI has no GPU, and, on a GPU, the kernel against the replay or the reference."""
