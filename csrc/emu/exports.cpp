// What the emulated build offers the extension (common/emulation.cpp): every op's launcher table, looked up by
// name. Compiled like the kernels (emu/cuda_emu.h force-included), so the tables point at emulated launchers.
#include <cstddef>
#include <cstring>

#include "fixed_point_rnn/fixed_point_rnn_cuda.h"
#include "gla/gla_cuda.h"
#include "linear_scan/linear_scan_cuda.h"
#include "selective_scan/selective_scan_cuda.h"
#include "selective_scan/selective_state_update_cuda.h"

namespace {
template <typename Launchers>
const void* table_if(const char* name, size_t size) {
  return std::strcmp(name, Launchers::kName) == 0 && size == sizeof(Launchers) ? &Launchers::get() : nullptr;
}
}  // namespace

// nullptr for an unknown name, or a table whose layout differs from the caller's (a stale build).
extern "C" __attribute__((visibility("default"))) const void* linmix_emu_launchers(const char* name, size_t size) {
  using namespace linmix;
  for (const void* t : {table_if<LinearScanCudaLaunchers>(name, size), table_if<SelectiveScanCudaLaunchers>(name, size),
                        table_if<SelectiveStateUpdateCudaLaunchers>(name, size), table_if<GlaCudaLaunchers>(name, size),
                        table_if<FixedPointRnnCudaLaunchers>(name, size)})
    if (t != nullptr) return t;
  return nullptr;
}
