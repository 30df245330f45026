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
  bool listed = false;  // LINMIX_KERNELS is checked whole at every call, so a misspelt name never goes unnoticed
  if (const char* list = std::getenv("LINMIX_KERNELS")) {
    const std::string names(list);
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
      listed = listed || name == r.name;
    }
  }
  if (r.is_default || listed) return true;
  const char* all = std::getenv("LINMIX_UNVERIFIED_KERNELS");
  return all != nullptr && std::strcmp(all, "1") == 0;
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
