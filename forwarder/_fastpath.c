/* forwarder._fastpath: the per-packet data path of flowstate-forwarder (forwarder/DATAPATH.md).
 *
 * Module glue only: the Engine and Result types live in fp_engine.c, PacketRing in fp_ring.c.
 * Python code imports this through forwarder.fastpath, never directly.
 */
#include "fp_codec.h"
#include "fp_engine.h"
#include "fp_mmh3.h"

/* Bumped whenever the Python-visible API of this module changes incompatibly. */
#define FP_ABI_VERSION 1

/* The engine's inlined MurmurHash3_x64_128, exposed so tests can compare it with `mmh3`. */
static PyObject *fastpath_hash_bytes(PyObject *module FP_UNUSED, PyObject *args) {
    Py_buffer data;
    unsigned long long seed = 0;
    if (!PyArg_ParseTuple(args, "y*|K:hash_bytes", &data, &seed))
        return NULL;
    if (seed > UINT32_MAX) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "seed must be in 0..2**32-1");
        return NULL;
    }
    uint64_t h[2];
    uint8_t out[16];
    fp_mmh3_x64_128(data.buf, (size_t)data.len, (uint32_t)seed, h);
    PyBuffer_Release(&data);
    for (int i = 0; i < 8; i++) {
        out[i] = (uint8_t)(h[0] >> (8 * i));
        out[8 + i] = (uint8_t)(h[1] >> (8 * i));
    }
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyMethodDef fastpath_methods[] = {
    {"hash_bytes", fastpath_hash_bytes, METH_VARARGS,
     "hash_bytes(data, seed=0) -> bytes: MurmurHash3_x64_128 as mmh3.hash_bytes(data, seed)."},
    {"group_by_node", fp_group_by_node, METH_VARARGS,
     "group_by_node(keys, slot_node, n_nodes) -> n_nodes + 1 lists of key indices by owning node "
     "(flowstate.store._codec.group_by_node_py, in C)."},
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
