// kd2._C: schemas of the kd2 operators and their CPU / CUDA kernels, registered with the PyTorch
// dispatcher when the library is loaded (`import kd2._C`). The fake (meta) kernels and the autograd
// formulas are registered from Python, in kd2/ops/_ext.py.
#include <Python.h>
#include <torch/library.h>

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include "kd2_ops.h"

// A bare Python module: importing it only has to load this shared library, whose static
// initialisers (TORCH_LIBRARY below) register the operators. No pybind11 needed.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C", /* m_name */
      "kd2's compiled operators, available as torch.ops.kd2.*", /* m_doc */
      -1, /* m_size */
      nullptr, /* m_methods */
  };
  return PyModule_Create(&module_def);
}

namespace kd2 {

int64_t cuda_version() {
#ifdef WITH_CUDA
  return CUDART_VERSION;
#else
  return -1;
#endif
}

}  // namespace kd2

TORCH_LIBRARY(kd2, m) {
  m.def(
      "box_mean_pool(Tensor features, Tensor boxes, Tensor batch_index, float stride) -> Tensor");
  m.def(
      "box_mean_pool_backward(Tensor grad, Tensor boxes, Tensor batch_index, float stride, "
      "SymInt batch_size, SymInt height, SymInt width) -> Tensor");
  m.def(
      "pgm_select(Tensor feats_a, Tensor feats_b, int num_prototypes, float alpha, "
      "float bandwidth, float quantile) -> Tensor");
  // CUDA runtime version the extension was compiled with (e.g. 13000), -1 for a CPU-only build.
  m.def("_cuda_version", &kd2::cuda_version);
}

TORCH_LIBRARY_IMPL(kd2, CPU, m) {
  m.impl("box_mean_pool", &kd2::box_mean_pool_cpu);
  m.impl("box_mean_pool_backward", &kd2::box_mean_pool_backward_cpu);
  m.impl("pgm_select", &kd2::pgm_select_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(kd2, CUDA, m) {
  m.impl("box_mean_pool", &kd2::box_mean_pool_cuda);
  m.impl("box_mean_pool_backward", &kd2::box_mean_pool_backward_cuda);
  m.impl("pgm_select", &kd2::pgm_select_cuda);
}
#endif
