// The one way kernels are launched, for nvcc and the CUDA emulator alike (csrc/emu/): the launch on `stream`,
// then the launch-error check, which raises with CUDA's (or the emulator's) message.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "common/cuda_check.h"

namespace linmix {

template <typename... KArgs, typename... Args>
void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
#if defined(LINMIX_CUDA_EMU)
  (void)stream;  // the emulator runs launches synchronously, in order
  emu::launch_kernel(kernel, grid, block, smem, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
#endif
  LINMIX_CHECK_LAUNCH();
}

}  // namespace linmix
