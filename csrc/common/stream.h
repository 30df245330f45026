// cudaStream_t for the torch-free launcher declarations (*_cuda.h). A CPU-only build declares the CUDA
// launchers too, so the torch glue names them in one template for both backends; it never registers
// (so never instantiates or calls) the CUDA side there.
#pragma once

#if defined(__CUDACC__) || defined(LINMIX_WITH_CUDA) || defined(LINMIX_CUDA_EMU)
#include <cuda_runtime_api.h>
#else
struct CUstream_st;
using cudaStream_t = CUstream_st*;
#endif
