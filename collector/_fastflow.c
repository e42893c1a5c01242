/* collector._fastflow: placeholder module; the real implementation replaces this file. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "collector._fastflow", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__fastflow(void) { return PyModule_Create(&module); }
