/* forwarder._fastpath: the per-packet data path of flowstate-forwarder (forwarder/DATAPATH.md).
 *
 * Module glue only: the Engine and Result types live in fp_engine.c, PacketRing in fp_ring.c.
 * Python code imports this through forwarder.fastpath, never directly.
 */
#include "fp_engine.h"

/* Bumped whenever the Python-visible API of this module changes incompatibly. */
#define FP_ABI_VERSION 1

static PyMethodDef fastpath_methods[] = {
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastpath",
    .m_doc = "flowstate C fast path.",
    .m_size = -1,
    .m_methods = fastpath_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "ABI_VERSION", FP_ABI_VERSION) < 0 ||
        fp_engine_module_init(m) < 0 || fp_ring_module_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
