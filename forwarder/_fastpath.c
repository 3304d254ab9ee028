/* forwarder._fastpath: the per-packet data path of flowstate-forwarder (minimal module). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyMethodDef fastpath_methods[] = {
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "flowstate C fast path.", -1, fastpath_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "ABI_VERSION", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
