// Shared memory for the CUDA emulator (internal.h's Arena, runtime.h's static_shared / dynamic_shared).
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "emu/internal.h"

namespace linmix::emu {
namespace {
constexpr unsigned char kCanary = 0xa5;
}

Arena::Arena() {
  if (kSanitizer != 2) map();
}

Arena::~Arena() { unmap(); }

void Arena::map() {
  void* p = mmap(nullptr, kCapacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "linmix CUDA emulator: cannot map %zu bytes of shared memory\n", kCapacity);
    std::abort();
  }
  mem_ = static_cast<unsigned char*>(p);
  poison(mem_, kCapacity);
}

void Arena::unmap() {
  if (mem_ == nullptr) return;
  unpoison(mem_, kCapacity);
  munmap(mem_, kCapacity);
  mem_ = nullptr;
}

void Arena::begin_block(size_t dyn) {
  if (mem_ == nullptr) map();
  for (const auto& s : statics_) poison(mem_ + s.offset, s.size);
  statics_.clear();
  redzones_.clear();
  dyn_ = dyn;
  static_bytes_ = 0;
  add_redzone(kDynOffset - kRedzone);
  fill(kDynOffset, dyn, 0xff);
  unpoison(mem_ + kDynOffset, dyn);
  cursor_ = kDynOffset + dyn;
  add_redzone(cursor_);
  cursor_ += kRedzone;
}

void Arena::end_block() {
  if (kSanitizer == 2) unmap();
}

unsigned char* Arena::find_or_add_static(const void* tag, size_t size, size_t align, bool& added) {
  added = false;
  for (const auto& s : statics_)
    if (s.tag == tag) return mem_ + s.offset;
  align = std::max<size_t>(align, 16);
  const size_t offset = (cursor_ + align - 1) / align * align;
  if (offset + size + kRedzone > kCapacity) return nullptr;
  fill(offset, size, 0xff);
  unpoison(mem_ + offset, size);
  statics_.push_back({tag, offset, size});
  static_bytes_ += size;
  cursor_ = offset + size;
  add_redzone(cursor_);
  cursor_ += kRedzone;
  added = true;
  return mem_ + offset;
}

std::string Arena::check_redzones() const {
  for (size_t off : redzones_)
    for (size_t i = 0; i < kRedzone; ++i)
      if (mem_[off + i] != kCanary) return describe_overrun(off, i);
  return {};
}

// Byte loops, not memset: ThreadSanitizer and AddressSanitizer intercept memset even when uninstrumented code calls
// it and would count the fill as an access of an emulated thread.
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void Arena::fill(size_t off, size_t n, unsigned char v) {
  volatile unsigned char* p = mem_ + off;
  for (size_t i = 0; i < n; ++i) p[i] = v;
}

void Arena::add_redzone(size_t off) {
  unpoison(mem_ + off, kRedzone);
  fill(off, kRedzone, kCanary);
  poison(mem_ + off, kRedzone);
  redzones_.push_back(off);
}

std::string Arena::describe_overrun(size_t redzone, size_t i) const {
  std::string where;
  if (redzone + kRedzone == kDynOffset) {
    where = std::to_string(kRedzone - i) + " bytes before the start of dynamic shared memory";
  } else if (redzone == kDynOffset + dyn_) {
    where = "at byte " + std::to_string(dyn_ + i) + " of dynamic shared memory, past its end (" + std::to_string(dyn_) +
            " bytes launched)";
  } else {
    for (const auto& s : statics_)
      if (s.offset + s.size == redzone)
        where = "at byte " + std::to_string(s.size + i) + " of a static __shared__ variable of " +
                std::to_string(s.size) + " bytes, past its end";
  }
  return "shared memory written " + where + " (found at a barrier or the block's end)";
}

// ---------------------------------------------------------------- runtime.h
void* static_shared(const void* tag, size_t size, size_t align, const char* name) {
  Worker& w = *self().worker;
  Launch& L = *w.block.launch;
  bool added = false;
  unsigned char* p = w.arena.find_or_add_static(tag, size, align, added);
  if (p == nullptr) fault(std::string("static __shared__ ") + name + ": the emulator's arena is full");
  if (added) {
    const size_t st = w.arena.static_bytes(), dyn = w.arena.dynamic_bytes();
    int max_dyn = 0;
    {
      std::lock_guard<std::mutex> lock(kernels_mutex());
      L.info->static_smem = std::max(L.info->static_smem, st);
      max_dyn = L.info->max_dynamic_smem;
    }
    const size_t limit = max_block_smem(L.cfg.arch);
    if (st + dyn > limit)
      fault("static (" + std::to_string(st) + " bytes) plus dynamic (" + std::to_string(dyn) +
            " bytes) shared memory exceed the " + std::to_string(limit) + " bytes of sm_" + std::to_string(L.cfg.arch));
    if (max_dyn < 0 && st + dyn > kDefaultSmem)
      fault("static (" + std::to_string(st) + " bytes) plus dynamic (" + std::to_string(dyn) +
            " bytes) shared memory exceed 48 KiB without cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  return p;
}

void* dynamic_shared(size_t align) {
  if (align > Arena::kDynOffset) fault("extern __shared__ aligned to more than 1024 bytes");
  return self().worker->arena.dynamic_base();
}

}  // namespace linmix::emu
