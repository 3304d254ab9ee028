/* Batch helpers of the Redis store's hot path (flowstate/store/_codec.py), in C.
 *
 * Pure functions of their arguments: the store uses them when the extension is built and
 * falls back to its Python reference otherwise; tests/unit/test_codec_c.py checks both agree.
 */
#ifndef FP_CODEC_H
#define FP_CODEC_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Redis Cluster hash slot of a key: CRC16-XMODEM mod 16384, honouring `{hash tags}` exactly as
 * flowstate.flow.key_slot (and Redis) do. */
int fp_key_slot(const char *key, Py_ssize_t len);

/* group_by_node(keys, slot_node, n_nodes) -> list of n_nodes + 1 lists of indices. */
PyObject *fp_group_by_node(PyObject *module, PyObject *args);

#endif
