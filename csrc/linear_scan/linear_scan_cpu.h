#pragma once

#include "common/dtype.h"
#include "linear_scan/params.h"

namespace linmix {

void linear_scan_fwd_cpu(const LinearScanParams& p, DType dtype);
void linear_scan_bwd_cpu(const LinearScanParams& p, DType dtype);

}  // namespace linmix
