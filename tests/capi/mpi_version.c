/* The MPI library seen from C and from the embedded mpi4py must be the same one. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdio.h>

#include <mpi.h>

#include "insitu.h"

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(version, &len);
    const int64_t g[1] = {1}, l[1] = {1}, s[1] = {0};
    const insitu_array_decl_t decl = {"x", INSITU_FLOAT64, 1, g, l, s};
    insitu_bridge_t *b = NULL;
    insitu_init(MPI_COMM_WORLD, "mpi-version-check", 1, &decl, &b); /* no cluster: starts Python, loads mpi4py */
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *mpi = PyImport_ImportModule("mpi4py.MPI");
    PyObject *v = mpi ? PyObject_CallMethod(mpi, "Get_library_version", NULL) : NULL;
    if (v == NULL) PyErr_Print();
    const char *py = v ? PyUnicode_AsUTF8(v) : "(mpi4py failed)";
    PyObject *sys = PyImport_ImportModule("sys");
    PyObject *exe = sys ? PyObject_GetAttrString(sys, "executable") : NULL;
    printf("C: %s\n---\nmpi4py: %s\n---\nsys.executable: %s\n", version, py, exe ? PyUnicode_AsUTF8(exe) : "?");
    PyGILState_Release(gil);
    insitu_finalize(&b);
    MPI_Finalize();
    return 0;
}
