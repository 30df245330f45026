"""One module per op: the autograd Function, the fake (meta) kernels and the public function."""
