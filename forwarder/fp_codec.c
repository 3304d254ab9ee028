/* Batch helpers of the Redis store's hot path (fp_codec.h). */
#include "fp_codec.h"

#include <string.h>

#define FP_CLUSTER_SLOTS 16384

/* CRC16-XMODEM (poly 0x1021, init 0: binascii.crc_hqx(data, 0)), one byte at a time. */
static uint16_t crc_table[256];
static int crc_ready;

static void crc_init(void) {
    for (int i = 0; i < 256; i++) {
        uint16_t c = (uint16_t)(i << 8);
        for (int j = 0; j < 8; j++)
            c = (c & 0x8000) ? (uint16_t)((c << 1) ^ 0x1021) : (uint16_t)(c << 1);
        crc_table[i] = c;
    }
    crc_ready = 1;
}

static uint16_t crc16(const uint8_t *p, Py_ssize_t n) {
    uint16_t c = 0;
    if (!crc_ready)
        crc_init();
    while (n-- > 0)
        c = (uint16_t)((c << 8) ^ crc_table[((c >> 8) ^ *p++) & 0xFF]);
    return c;
}

int fp_key_slot(const char *key, Py_ssize_t len) {
    const char *open = memchr(key, '{', (size_t)len);
    if (open != NULL) {
        Py_ssize_t start = open - key;
        const char *close = memchr(open + 1, '}', (size_t)(len - start - 1));
        if (close != NULL && close > open + 1) {
            key = open + 1;
            len = close - open - 1;
        }
    }
    return crc16((const uint8_t *)key, len) % FP_CLUSTER_SLOTS;
}

/* Same result, and for keys of bytes and a slot map of ints the same errors, as the Python
 * reference `flowstate.store._codec.group_by_node_py`: keys[i]'s index goes to the list
 * slot_node[slot(keys[i])] (-1, the last list: no node owns the slot). */
PyObject *fp_group_by_node(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *keys_o, *map_o;
    Py_ssize_t n_nodes;
    if (!PyArg_ParseTuple(args, "OOn:group_by_node", &keys_o, &map_o, &n_nodes))
        return NULL;
    if (n_nodes < 0) {
        PyErr_SetString(PyExc_ValueError, "n_nodes must be >= 0");
        return NULL;
    }
    PyObject *keys = PySequence_Fast(keys_o, "keys must be a sequence of bytes");
    if (keys == NULL)
        return NULL;
    PyObject *map = PySequence_Fast(map_o, "slot_node must be a sequence of ints");
    if (map == NULL) {
        Py_DECREF(keys);
        return NULL;
    }
    PyObject *groups = PyList_New(n_nodes + 1);
    if (groups == NULL)
        goto error;
    for (Py_ssize_t g = 0; g <= n_nodes; g++) {
        PyObject *lst = PyList_New(0);
        if (lst == NULL)
            goto error;
        PyList_SET_ITEM(groups, g, lst);
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys), map_len = PySequence_Fast_GET_SIZE(map);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *k = PySequence_Fast_GET_ITEM(keys, i);
        if (!PyBytes_Check(k)) {
            PyErr_Format(PyExc_TypeError, "keys must be bytes, not %.100s", Py_TYPE(k)->tp_name);
            goto error;
        }
        int slot = fp_key_slot(PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k));
        if (slot >= map_len) {
            PyErr_SetString(PyExc_IndexError, "slot_node has no entry for a key's slot");
            goto error;
        }
        long node = PyLong_AsLong(PySequence_Fast_GET_ITEM(map, slot));
        if (node == -1 && PyErr_Occurred())
            goto error;
        /* Python list indexing of the n_nodes + 1 groups: -1 is the last one. */
        if (node < -(long)(n_nodes + 1) || node > (long)n_nodes) {
            PyErr_SetString(PyExc_IndexError, "list index out of range");
            goto error;
        }
        Py_ssize_t g = node < 0 ? node + n_nodes + 1 : node;
        PyObject *idx = PyLong_FromSsize_t(i);
        if (idx == NULL)
            goto error;
        int rc = PyList_Append(PyList_GET_ITEM(groups, g), idx);
        Py_DECREF(idx);
        if (rc < 0)
            goto error;
    }
    Py_DECREF(keys);
    Py_DECREF(map);
    return groups;
error:
    Py_DECREF(keys);
    Py_DECREF(map);
    Py_XDECREF(groups); /* unset items are NULL: list dealloc skips them */
    return NULL;
}
