#include "fp_engine.h"
int fp_ring_module_init(PyObject *module) { return 0; }
