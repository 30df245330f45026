// The per-family switches of the kernel registry (kernels.h).
#include "common/kernels.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace linmix {

bool kernel_enabled(KernelFamily family) {
  const KernelRecord& r = kernel_record(family);
  if (r.is_default) return true;
  const char* all = std::getenv("LINMIX_UNVERIFIED_KERNELS");
  if (all != nullptr && std::strcmp(all, "1") == 0) return true;
  const char* list = std::getenv("LINMIX_KERNELS");
  if (list == nullptr) return false;
  bool on = false;
  std::string names(list);
  for (size_t start = 0; start <= names.size();) {
    const size_t end = std::min(names.find(',', start), names.size());
    const std::string name = names.substr(start, end - start);
    start = end + 1;
    if (name.empty()) continue;
    bool known = false;
    for (const KernelRecord& k : kKernels) known = known || name == k.name;
    if (!known) {
      std::string valid;
      for (const KernelRecord& k : kKernels) valid += std::string(valid.empty() ? "" : ", ") + k.name;
      throw std::invalid_argument("linmix: LINMIX_KERNELS names an unknown kernel family '" + name +
                                  "'; the families are " + valid);
    }
    on = on || name == r.name;
  }
  return on;
}

bool kernel_serves_uncovered_call(KernelFamily family, bool& warn) {
  warn = false;
  if (kernel_enabled(family)) return true;
  if (kernel_record(family).tier != Tier::kEmulationVerified) return false;
  static std::atomic<bool> warned[static_cast<int>(KernelFamily::kCount)];
  warn = !warned[static_cast<int>(family)].exchange(true);
  return true;
}

}  // namespace linmix
