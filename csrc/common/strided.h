// The one view through which kernels and CPU loops read and write a tensor: its base pointer and the element
// strides of its leading N dims (64-bit), as the glue found them, so a non-contiguous input needs no copy. The
// innermost dim the kernels walk (D, L, X) is unit-stride unless the view says otherwise. Torch-free.
#pragma once

#include <cstdint>

#include "common/math.h"

namespace linmix {

template <int N>
struct StridedView {
  void* ptr = nullptr;
  int64_t stride[N] = {};

  // The element at the leading indices i0, i1, ... (as many as given, at most N), typed T (const-qualify T to
  // read). With fewer indices than N it is the start of that row.
  template <typename T, typename... Idx>
  LINMIX_HD T* at(Idx... idx) const {
    static_assert(sizeof...(Idx) >= 1 && sizeof...(Idx) <= N, "StridedView::at: 1 to N indices");
    T* p = static_cast<T*>(ptr);
    int d = 0;
    ((p += static_cast<int64_t>(idx) * stride[d++]), ...);
    return p;
  }

  // The element offset of the leading indices i0, i1, ... (for loads whose dtype is known only at run time).
  template <typename... Idx>
  LINMIX_HD int64_t offset(Idx... idx) const {
    static_assert(sizeof...(Idx) >= 1 && sizeof...(Idx) <= N, "StridedView::offset: 1 to N indices");
    int64_t off = 0;
    int d = 0;
    ((off += static_cast<int64_t>(idx) * stride[d++]), ...);
    return off;
  }
};

}  // namespace linmix
