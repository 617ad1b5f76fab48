// The Python module pyfast._C: an empty module whose only job is to be loadable.
//
// The kernels are registered with torch's dispatcher by the static initializers
// of TORCH_LIBRARY / TORCH_LIBRARY_IMPL (registration.cpp, cpu/, cuda/), which
// run when the shared library is dlopen'ed. So either `import pyfast._C` (after
// `import torch`, which loads libc10/libtorch that this library links against)
// or `torch.ops.load_library(path)` makes torch.ops.pyfast_C.* available.
// No pybind11 and no torch/extension.h: this file only needs Python.h.
#include <Python.h>

static struct PyModuleDef pyfast_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",                                                  // m_name
    "Compiled kernels of pyfast (registers torch.ops.pyfast_C.*).",  // m_doc
    -1,                                                    // m_size
    nullptr,                                               // m_methods
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pyfast_c_module); }
