// CUDA runtime entry points the launchers call, for the host emulation build only (no cudart).
#include <cuda_runtime.h>

#include <cstdlib>

extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "host emulation"; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// Four "SMs", so that persistent kernels loop over several work items per block in the CPU tests;
// the shared-memory opt-in of an H100 unless GKA_EMU_SMEM_OPTIN says otherwise (tests of the
// smaller-memory paths).
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = 0;
  if (attr == cudaDevAttrMultiProcessorCount) *value = 4;
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    const char* env = std::getenv("GKA_EMU_SMEM_OPTIN");
    *value = env ? std::atoi(env) : 232448;
  }
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}
}
