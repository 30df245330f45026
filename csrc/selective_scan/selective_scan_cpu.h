#pragma once

#include "common/dtype.h"
#include "selective_scan/params.h"

namespace linmix {

void selective_scan_fwd_cpu(const SelectiveScanParams& p, DType dtype);
void selective_scan_bwd_cpu(const SelectiveScanParams& p, DType dtype);

}  // namespace linmix
