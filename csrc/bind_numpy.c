/* PLACEHOLDER until the NumPy binding lands. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_numpy_C", NULL, 0, NULL};
PyMODINIT_FUNC PyInit__numpy_C(void) { return PyModuleDef_Init(&mod); }
