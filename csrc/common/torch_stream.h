// The current torch CUDA stream as a raw cudaStream_t, for the *_torch.cpp launchers.
#pragma once

#ifdef LINMIX_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace linmix {
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
}  // namespace linmix
#endif
