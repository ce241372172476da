// pybind11 bindings of gka_kernels._C. Every launcher takes raw device pointers (uintptr_t from
// tensor.data_ptr()) and the caller's stream handle, so the build needs no torch headers.
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace gka {
void state_copy_launch(uintptr_t src, uintptr_t dst, uintptr_t src_idx, uintptr_t dst_idx,
                       int64_t n, int64_t slot_elems, uintptr_t stream);
}

namespace py = pybind11;

static int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "gka-kernels CUDA C++ decode kernels (raw-pointer launchers)";
  m.def("cuda_runtime_version", &cuda_runtime_version);
  m.def("state_copy", &gka::state_copy_launch, py::arg("src"), py::arg("dst"), py::arg("src_idx"),
        py::arg("dst_idx"), py::arg("n"), py::arg("slot_elems"), py::arg("stream"),
        "dst[dst_idx[i]] = src[src_idx[i]] over float32 state pools; -1 skips the pair");
}
