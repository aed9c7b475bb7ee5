/* One MPI per process: insitu_init's MPI check, and the MPI library seen from C and from the embedded mpi4py.
 *
 * Calls insitu_init (no cluster needed: the MPI check comes first), then, unless the check refused
 * (or argv[1] is "noimport"), imports mpi4py.MPI in the embedded Python and compares its
 * Get_library_version with the program's. Prints "<what> <value> <rank>[ | message]" lines:
 * init (status | message), same-version (1/0), executable (sys.executable) and libmpi (every
 * mapped file whose name starts with libmpi, comma-separated: exactly one MPI library, or not). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdio.h>
#include <string.h>

#include <mpi.h>

#include "insitu.h"

static void print_mapped_libmpi(int rank) {
    char line[4096], seen[8192] = "";
    FILE *maps = fopen("/proc/self/maps", "r");
    while (maps && fgets(line, sizeof line, maps)) {
        char *path = strchr(line, '/');
        if (path == NULL) continue;
        path[strcspn(path, "\n")] = '\0';
        const char *base = strrchr(path, '/') + 1;
        if (strncmp(base, "libmpi", 6) != 0 || strstr(seen, path) != NULL) continue;
        if (seen[0] != '\0') strncat(seen, ",", sizeof seen - strlen(seen) - 1);
        strncat(seen, path, sizeof seen - strlen(seen) - 1);
    }
    if (maps) fclose(maps);
    printf("libmpi %s %d\n", seen, rank);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, len = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    MPI_Get_library_version(version, &len);
    const int64_t g[1] = {1}, l[1] = {rank == 0}, s[1] = {0};
    const insitu_array_decl_t decl = {"x", INSITU_FLOAT64, 1, g, l, s};
    insitu_bridge_t *b = NULL;
    insitu_status_t st = insitu_init(MPI_COMM_WORLD, "mpi-version-check", 1, &decl, &b);
    char message[4096];
    snprintf(message, sizeof message, "%s", st == INSITU_OK ? "" : insitu_last_error());
    message[strcspn(message, "\n")] = '\0';
    printf("init %s %d | %s\n", insitu_status_name(st), rank, message);
    if (st != INSITU_ERR_MPI_MISMATCH && !(argc > 1 && strcmp(argv[1], "noimport") == 0)) {
        PyGILState_STATE gil = PyGILState_Ensure();
        PyObject *mpi = PyImport_ImportModule("mpi4py.MPI");
        PyObject *v = mpi ? PyObject_CallMethod(mpi, "Get_library_version", NULL) : NULL;
        if (v == NULL) PyErr_Print();
        printf("same-version %d %d\n", v != NULL && strcmp(PyUnicode_AsUTF8(v), version) == 0, rank);
        PyObject *sys = PyImport_ImportModule("sys");
        PyObject *exe = sys ? PyObject_GetAttrString(sys, "executable") : NULL;
        printf("executable %s %d\n", exe ? PyUnicode_AsUTF8(exe) : "?", rank);
        PyGILState_Release(gil);
    }
    print_mapped_libmpi(rank);
    fflush(stdout);
    insitu_finalize(&b);
    MPI_Finalize();
    return 0;
}
