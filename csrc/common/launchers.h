// Launcher tables: each op's CUDA launchers gathered in one struct (<op>_cuda.h), so the torch glue can run them
// from either build of the kernels: the nvcc build (Launchers::get(), linked into the extension) or the CUDA
// emulator's (emulated_launchers<Launchers>(), common/emulation.h). Torch-free.
#pragma once

#include <stdexcept>

#include "common/dtype.h"
#include "common/stream.h"

namespace linmix {

// The position of a CUDA element type in a PerCudaDtype table; float64 has no CUDA kernels.
inline int cuda_dtype_index(DType dt) {
  switch (dt) {
    case DType::kFloat32: return 0;
    case DType::kFloat16: return 1;
    case DType::kBFloat16: return 2;
    default: throw std::invalid_argument("linmix: float64 runs on the CPU backend only");
  }
}

// One launcher per CUDA element type (fp32, fp16, bf16), called with the element type picked at run time.
template <typename Fn>
struct PerCudaDtype {
  Fn* by_dtype[3];
  template <typename... Args>
  void operator()(DType dt, Args&&... args) const {
    by_dtype[cuda_dtype_index(dt)](static_cast<Args&&>(args)...);
  }
};

}  // namespace linmix

// The PerCudaDtype initialiser for a launcher template NAME<DType>.
#define LINMIX_PER_CUDA_DTYPE(NAME) \
  {{&NAME<::linmix::DType::kFloat32>, &NAME<::linmix::DType::kFloat16>, &NAME<::linmix::DType::kBFloat16>}}
