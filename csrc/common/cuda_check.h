// Launch-error checking for torch-free .cu files: a failed launch throws std::runtime_error,
// which the *_torch.cpp caller lets propagate (torch turns it into a Python RuntimeError).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define LINMIX_CUDA_CHECK(expr)                                                                  \
  do {                                                                                           \
    cudaError_t linmix_err_ = (expr);                                                            \
    if (linmix_err_ != cudaSuccess) {                                                            \
      throw std::runtime_error(std::string("linmix CUDA error: ") + cudaGetErrorString(linmix_err_) + \
                               " at " + __FILE__ + ":" + std::to_string(__LINE__));             \
    }                                                                                            \
  } while (0)

#define LINMIX_CHECK_LAUNCH() LINMIX_CUDA_CHECK(cudaGetLastError())
