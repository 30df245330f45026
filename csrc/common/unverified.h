// The opt-in switch for CUDA kernels that compiled but have not yet passed the GPU test suite and
// compute-sanitizer on a real device. Every op's default path is a GPU-verified kernel; a new kernel runs only
// when the user sets LINMIX_UNVERIFIED_KERNELS=1. bench/results/README.md records which commit and GPU
// verified each kernel; a GPU session that verifies one makes it the default and drops its switch.
#pragma once

#include <cstdlib>
#include <cstring>

namespace linmix {

// Read at every call (a getenv costs nanoseconds beside a launch), so a test can toggle it per case.
inline bool unverified_kernels_enabled() {
  const char* v = std::getenv("LINMIX_UNVERIFIED_KERNELS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

}  // namespace linmix
