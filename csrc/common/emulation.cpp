// Loading the emulated build of the CUDA kernels (emulation.h).
#include "common/emulation.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>

namespace linmix {
namespace {

struct Build {
  const char* sanitizer;  // LINMIX_EMU_SANITIZER value
  const char* file;       // beside the extension
};
constexpr Build kBuilds[] = {{"", "liblinmix_cuda_emu.so"},
                             {"address", "liblinmix_cuda_emu_asan.so"},
                             {"thread", "liblinmix_cuda_emu_tsan.so"},
                             {"traffic", "liblinmix_cuda_emu_traffic.so"}};

std::string extension_dir() {
  Dl_info info{};
  dladdr(reinterpret_cast<const void*>(&emulate_cuda), &info);
  std::string path = info.dli_fname != nullptr ? info.dli_fname : "";
  return path.substr(0, path.rfind('/') + 1);
}

const Build& selected_build() {
  const char* s = std::getenv("LINMIX_EMU_SANITIZER");
  const std::string want = s ? s : "";
  for (const Build& b : kBuilds)
    if (want == b.sanitizer) return b;
  throw std::invalid_argument("linmix: LINMIX_EMU_SANITIZER must be empty, 'address', 'thread' or 'traffic', got '" +
                              want + "'");
}

std::mutex g_mutex;
void* g_handle = nullptr;
const Build* g_loaded = nullptr;

void* handle() {
  const Build& b = selected_build();
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_handle != nullptr) {
    if (g_loaded != &b)
      throw std::runtime_error(std::string("linmix: the emulated build ") + g_loaded->file +
                               " is already loaded in this process; LINMIX_EMU_SANITIZER cannot change after that");
    return g_handle;
  }
  const std::string path = extension_dir() + b.file;
  g_handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (g_handle == nullptr) {
    const char* err = dlerror();
    throw std::runtime_error(std::string("linmix: LINMIX_EMULATE_CUDA=1 needs the emulated build of the CUDA kernels, "
                                         "and loading ") +
                             path + " failed (" + (err ? err : "?") +
                             "). Build it with LINMIX_CUDA_EMU=ON (and LINMIX_CUDA_EMU_SANITIZERS=ON for the "
                             "sanitizer builds, which also need their runtime preloaded: see `python -m "
                             "linmix.emulation --help`).");
  }
  g_loaded = &b;
  return g_handle;
}

template <typename Fn>
Fn* symbol(const char* name) {
  Fn* f = reinterpret_cast<Fn*>(dlsym(handle(), name));
  if (f == nullptr) throw std::runtime_error(std::string("linmix: the emulated build lacks ") + name);
  return f;
}

}  // namespace

bool emulate_cuda() {
  const char* v = std::getenv("LINMIX_EMULATE_CUDA");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

const void* emulated_launcher_table(const char* name, size_t size) {
  const void* t = symbol<const void*(const char*, size_t)>("linmix_emu_launchers")(name, size);
  if (t == nullptr)
    throw std::runtime_error(std::string("linmix: the emulated build has no launcher table '") + name +
                             "' of this layout; rebuild linmix so the extension and the emulated build match");
  return t;
}

std::string emulated_builds() {
  std::string out;
  const std::string dir = extension_dir();
  for (const Build& b : kBuilds) {
    const std::string path = dir + b.file;
    if (FILE* f = std::fopen(path.c_str(), "rb")) {
      std::fclose(f);
      out += std::string(out.empty() ? "" : ",") + (*b.sanitizer ? b.sanitizer : "plain");
    }
  }
  return out;
}

std::string emulated_kernels_run() {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_handle == nullptr) return "";
  }
  return symbol<const char*()>("linmix_emu_kernels_run")();
}

std::pair<int, std::string> emulator_selftest(const std::string& name) {
  char msg[4096] = {0};
  const int code = symbol<int(const char*, char*, size_t)>("linmix_emu_selftest")(name.c_str(), msg, sizeof msg);
  return {code, msg};
}

}  // namespace linmix
