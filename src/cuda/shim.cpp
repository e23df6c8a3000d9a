// The C++ side of `src/cuda`: what tch does not bind. Built by build.rs (the `cc` crate) when the
// libtorch found has CUDA and the CUDA headers sit beside it (PyPI's `torch` wheel ships both).
//
// - NVRTC and the CUDA driver API, loaded with dlopen: nothing here links against them, so a binary
//   starts on a machine without a GPU (or without a driver), and NVRTC compiles there too.
// - libtorch's current CUDA stream, so our kernels run in order with its kernels (and get captured
//   into a CUDA graph with them).
// - at::cuda::CUDAGraph: capture on a side stream, replay on the current one.
//
// Every function returns 0 on success, or non-zero with a message in `err` (never throws).
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <nvrtc.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>

namespace {

void set_err(char* err, size_t len, const std::string& msg) {
  if (err && len) {
    std::snprintf(err, len, "%s", msg.c_str());
  }
}

// The folder of libc10_cuda.so: PyPI's layout puts NVRTC at ../../nvidia/cu13/lib from there.
std::string torch_lib_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&c10::cuda::device_count), &info) && info.dli_fname) {
    std::string path(info.dli_fname);
    auto slash = path.rfind('/');
    if (slash != std::string::npos) return path.substr(0, slash);
  }
  return ".";
}

void* open_library(const char* soname, const std::string& fallback, std::string& why) {
  if (void* h = dlopen(soname, RTLD_NOW | RTLD_GLOBAL)) return h;
  why = dlerror();
  if (!fallback.empty()) {
    if (void* h = dlopen(fallback.c_str(), RTLD_NOW | RTLD_GLOBAL)) return h;
    why += "; " + std::string(dlerror());
  }
  return nullptr;
}

struct Nvrtc {
  nvrtcResult (*version)(int*, int*);
  nvrtcResult (*create)(nvrtcProgram*, const char*, const char*, int, const char* const*, const char* const*);
  nvrtcResult (*compile)(nvrtcProgram, int, const char* const*);
  nvrtcResult (*log_size)(nvrtcProgram, size_t*);
  nvrtcResult (*log)(nvrtcProgram, char*);
  nvrtcResult (*cubin_size)(nvrtcProgram, size_t*);
  nvrtcResult (*cubin)(nvrtcProgram, char*);
  nvrtcResult (*ptx_size)(nvrtcProgram, size_t*);
  nvrtcResult (*ptx)(nvrtcProgram, char*);
  nvrtcResult (*destroy)(nvrtcProgram*);
  const char* (*error_string)(nvrtcResult);
};

struct Driver {
  CUresult (*init)(unsigned);
  CUresult (*device_get)(CUdevice*, int);
  CUresult (*attribute)(int*, CUdevice_attribute, CUdevice);
  CUresult (*primary_retain)(CUcontext*, CUdevice);
  CUresult (*ctx_set_current)(CUcontext);
  CUresult (*module_load)(CUmodule*, const void*);
  CUresult (*module_function)(CUfunction*, CUmodule, const char*);
  CUresult (*launch)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                     CUstream, void**, void**);
  CUresult (*error_string)(CUresult, const char**);
};

template <typename F>
bool bind(void* lib, const char* name, F& f, std::string& why) {
  f = reinterpret_cast<F>(dlsym(lib, name));
  if (!f) why = std::string("missing symbol ") + name;
  return f != nullptr;
}

// `Api` loaded once per process by `load(api, why)`; later calls return it, or the same failure.
template <typename Api, typename Load>
const Api* load_once(std::string& why, Load load) {
  static std::once_flag once;
  static Api api;
  static const Api* loaded = nullptr;
  static std::string failure;
  std::call_once(once, [&] {
    if (load(api, failure)) loaded = &api;
  });
  why = failure;
  return loaded;
}

const Nvrtc* nvrtc(std::string& why) {
  return load_once<Nvrtc>(why, [](Nvrtc& api, std::string& failure) {
    std::string w;
    void* lib = open_library("libnvrtc.so.13", torch_lib_dir() + "/../../nvidia/cu13/lib/libnvrtc.so.13", w);
    if (!lib) {
      failure = "NVRTC (libnvrtc.so.13) could not be loaded: " + w;
      return false;
    }
    // NVRTC opens its builtins library by name; from a folder not on the search path, load it first.
    Dl_info info;
    void* symbol = dlsym(lib, "nvrtcVersion");
    if (symbol && dladdr(symbol, &info) && info.dli_fname) {
      std::string dir(info.dli_fname);
      dir = dir.substr(0, dir.rfind('/') + 1);
      dlopen((dir + "libnvrtc-builtins.so.13.0").c_str(), RTLD_NOW | RTLD_GLOBAL);
    }
    bool ok = bind(lib, "nvrtcVersion", api.version, w) && bind(lib, "nvrtcCreateProgram", api.create, w) &&
              bind(lib, "nvrtcCompileProgram", api.compile, w) &&
              bind(lib, "nvrtcGetProgramLogSize", api.log_size, w) &&
              bind(lib, "nvrtcGetProgramLog", api.log, w) && bind(lib, "nvrtcGetCUBINSize", api.cubin_size, w) &&
              bind(lib, "nvrtcGetCUBIN", api.cubin, w) && bind(lib, "nvrtcGetPTXSize", api.ptx_size, w) &&
              bind(lib, "nvrtcGetPTX", api.ptx, w) && bind(lib, "nvrtcDestroyProgram", api.destroy, w) &&
              bind(lib, "nvrtcGetErrorString", api.error_string, w);
    if (!ok) failure = "NVRTC: " + w;
    return ok;
  });
}

const Driver* driver(std::string& why) {
  return load_once<Driver>(why, [](Driver& api, std::string& failure) {
    std::string w;
    void* lib = open_library("libcuda.so.1", "", w);
    if (!lib) {
      failure = "the CUDA driver (libcuda.so.1) could not be loaded: " + w;
      return false;
    }
    bool ok = bind(lib, "cuInit", api.init, w) && bind(lib, "cuDeviceGet", api.device_get, w) &&
              bind(lib, "cuDeviceGetAttribute", api.attribute, w) &&
              bind(lib, "cuDevicePrimaryCtxRetain", api.primary_retain, w) &&
              bind(lib, "cuCtxSetCurrent", api.ctx_set_current, w) &&
              bind(lib, "cuModuleLoadData", api.module_load, w) &&
              bind(lib, "cuModuleGetFunction", api.module_function, w) &&
              bind(lib, "cuLaunchKernel", api.launch, w) && bind(lib, "cuGetErrorString", api.error_string, w);
    if (ok && api.init(0) != CUDA_SUCCESS) {
      ok = false;
      w = "cuInit failed (no usable GPU)";
    }
    if (!ok) failure = "CUDA driver: " + w;
    return ok;
  });
}

std::string cu_error(const Driver* d, CUresult r) {
  const char* s = nullptr;
  d->error_string(r, &s);
  return s ? s : ("CUDA error " + std::to_string(static_cast<int>(r)));
}

// The CUDA runtime functions used here, from the libcudart libtorch loaded: calling them directly (or
// through c10's inline helpers) would make this binary need libcudart.so.13 on its own search path.
struct Runtime {
  cudaError_t (*synchronize)(cudaStream_t);
  cudaError_t (*is_capturing)(cudaStream_t, cudaStreamCaptureStatus*);
};

const Runtime* runtime(std::string& why) {
  return load_once<Runtime>(why, [](Runtime& api, std::string& failure) {
    std::string w;
    void* lib = dlopen("libcudart.so.13", RTLD_NOW | RTLD_NOLOAD);
    if (!lib) lib = RTLD_DEFAULT;
    bool ok = bind(lib, "cudaStreamSynchronize", api.synchronize, w) &&
              bind(lib, "cudaStreamIsCapturing", api.is_capturing, w);
    if (!ok) failure = "CUDA runtime: " + w;
    return ok;
  });
}

void synchronize(const Runtime* rt, cudaStream_t stream) {
  cudaError_t r = rt->synchronize(stream);
  if (r != cudaSuccess) throw std::runtime_error("cudaStreamSynchronize failed: error " + std::to_string(r));
}

// libtorch works in the device's primary context through the runtime API; the driver calls need it
// current on this thread.
bool make_current(const Driver* d, int device, std::string& why) {
  // Retained once per device (the primary context lives as long as the process).
  static std::mutex lock;
  static CUcontext contexts[64] = {};
  if (device < 0 || device >= 64) return why = "device index out of range", false;
  CUcontext ctx;
  {
    std::lock_guard<std::mutex> guard(lock);
    if (!contexts[device]) {
      CUdevice dev;
      CUresult r = d->device_get(&dev, device);
      if (r == CUDA_SUCCESS) r = d->primary_retain(&contexts[device], dev);
      if (r != CUDA_SUCCESS) return why = cu_error(d, r), false;
    }
    ctx = contexts[device];
  }
  CUresult r = d->ctx_set_current(ctx);
  if (r != CUDA_SUCCESS) why = cu_error(d, r);
  return r == CUDA_SUCCESS;
}

}  // namespace

extern "C" {

void scc_free(void* p) { std::free(p); }

int scc_nvrtc_version(int* major, int* minor, char* err, size_t errlen) {
  std::string why;
  const Nvrtc* n = nvrtc(why);
  if (!n) return set_err(err, errlen, why), 1;
  return n->version(major, minor) == NVRTC_SUCCESS ? 0 : (set_err(err, errlen, "nvrtcVersion failed"), 1);
}

// Compiles `src` with `opts`; on success `*image` (malloc'd, `*image_len` bytes) is a CUBIN when `cubin`
// is non-zero, else NUL-terminated PTX. `*log` (malloc'd, NUL-terminated, may be empty) is NVRTC's log
// either way.
int scc_nvrtc_compile(const char* src, const char* name, const char* const* opts, int nopts, int cubin,
                      char** image, size_t* image_len, char** log, char* err, size_t errlen) {
  *image = nullptr;
  *log = nullptr;
  std::string why;
  const Nvrtc* n = nvrtc(why);
  if (!n) return set_err(err, errlen, why), 1;
  nvrtcProgram prog;
  nvrtcResult r = n->create(&prog, src, name, 0, nullptr, nullptr);
  if (r != NVRTC_SUCCESS) return set_err(err, errlen, n->error_string(r)), 1;
  nvrtcResult compiled = n->compile(prog, nopts, opts);
  size_t log_size = 0;
  n->log_size(prog, &log_size);
  *log = static_cast<char*>(std::calloc(log_size + 1, 1));
  if (log_size) n->log(prog, *log);
  if (compiled != NVRTC_SUCCESS) {
    set_err(err, errlen, n->error_string(compiled));
    n->destroy(&prog);
    return 1;
  }
  size_t size = 0;
  r = cubin ? n->cubin_size(prog, &size) : n->ptx_size(prog, &size);
  if (r == NVRTC_SUCCESS) {
    *image = static_cast<char*>(std::malloc(size));
    r = cubin ? n->cubin(prog, *image) : n->ptx(prog, *image);
    *image_len = size;
  }
  n->destroy(&prog);
  if (r != NVRTC_SUCCESS) return set_err(err, errlen, n->error_string(r)), 1;
  return 0;
}

int scc_device_arch(int device, int* major, int* minor, char* err, size_t errlen) {
  std::string why;
  const Driver* d = driver(why);
  if (!d) return set_err(err, errlen, why), 1;
  CUdevice dev;
  CUresult r = d->device_get(&dev, device);
  if (r == CUDA_SUCCESS) r = d->attribute(major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
  if (r == CUDA_SUCCESS) r = d->attribute(minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
  if (r != CUDA_SUCCESS) return set_err(err, errlen, cu_error(d, r)), 1;
  return 0;
}

int scc_module_load(int device, const void* image, void** module, char* err, size_t errlen) {
  std::string why;
  const Driver* d = driver(why);
  if (!d) return set_err(err, errlen, why), 1;
  if (!make_current(d, device, why)) return set_err(err, errlen, why), 1;
  CUresult r = d->module_load(reinterpret_cast<CUmodule*>(module), image);
  if (r != CUDA_SUCCESS) return set_err(err, errlen, cu_error(d, r)), 1;
  return 0;
}

int scc_module_function(void* module, const char* name, void** function, char* err, size_t errlen) {
  std::string why;
  const Driver* d = driver(why);
  if (!d) return set_err(err, errlen, why), 1;
  CUresult r = d->module_function(reinterpret_cast<CUfunction*>(function), static_cast<CUmodule>(module), name);
  if (r != CUDA_SUCCESS) return set_err(err, errlen, cu_error(d, r) + " (" + name + ")"), 1;
  return 0;
}

// Launches on libtorch's current stream of `device` (a capture stream while a graph is captured).
int scc_launch(int device, void* function, unsigned grid, unsigned block, void** args, char* err,
               size_t errlen) {
  std::string why;
  const Driver* d = driver(why);
  if (!d) return set_err(err, errlen, why), 1;
  if (!make_current(d, device, why)) return set_err(err, errlen, why), 1;
  try {
    CUstream stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
    CUresult r = d->launch(static_cast<CUfunction>(function), grid, 1, 1, block, 1, 1, 0, stream, args, nullptr);
    if (r != CUDA_SUCCESS) return set_err(err, errlen, cu_error(d, r)), 1;
  } catch (const std::exception& e) {
    return set_err(err, errlen, e.what()), 1;
  }
  return 0;
}

// 1 while libtorch's current stream of `device` is being captured into a graph, else 0.
int scc_stream_capturing(int device) {
  try {
    std::string why;
    const Runtime* rt = runtime(why);
    cudaStreamCaptureStatus status;
    auto stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
    if (!rt || rt->is_capturing(stream, &status) != cudaSuccess) return 0;
    return status == cudaStreamCaptureStatusActive ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

void* scc_graph_new() {
  try {
    return new at::cuda::CUDAGraph();
  } catch (...) {
    return nullptr;
  }
}

void scc_graph_free(void* graph) { delete static_cast<at::cuda::CUDAGraph*>(graph); }

// Runs `body(ctx)` `warmup` times, then once under capture, all on a side stream of `device` (capture
// needs a stream other than the default one), with the current stream synchronised before and after.
int scc_graph_capture(void* graph, int device, int warmup, void (*body)(void*), void* ctx, char* err,
                      size_t errlen) {
  std::string why;
  const Runtime* rt = runtime(why);
  if (!rt) return set_err(err, errlen, why), 1;
  auto index = static_cast<c10::DeviceIndex>(device);
  auto previous = c10::cuda::getCurrentCUDAStream(index);
  try {
    synchronize(rt, previous.stream());
    auto side = c10::cuda::getStreamFromPool(false, index);
    c10::cuda::setCurrentCUDAStream(side);
    for (int i = 0; i < warmup; ++i) body(ctx);
    synchronize(rt, side.stream());
    auto* g = static_cast<at::cuda::CUDAGraph*>(graph);
    g->capture_begin();
    body(ctx);
    g->capture_end();
    synchronize(rt, side.stream());
  } catch (const std::exception& e) {
    c10::cuda::setCurrentCUDAStream(previous);
    return set_err(err, errlen, e.what()), 1;
  }
  c10::cuda::setCurrentCUDAStream(previous);
  return 0;
}

int scc_graph_replay(void* graph, char* err, size_t errlen) {
  try {
    static_cast<at::cuda::CUDAGraph*>(graph)->replay();
  } catch (const std::exception& e) {
    return set_err(err, errlen, e.what()), 1;
  }
  return 0;
}

}  // extern "C"
