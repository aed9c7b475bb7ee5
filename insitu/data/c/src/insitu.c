/*
 * libinsitu: the C-callable shim of insitu. Embeds CPython and forwards every call to
 * insitu.capi (which never raises). See ../include/insitu.h for the API and
 * docs/coupling-c-fortran.md for why CPython embedding (and not cffi).
 *
 * Built by `insitu build-shim` with -DINSITU_PYTHON_DEFAULT="<interpreter>" recorded at
 * build time; INSITU_PYTHON overrides it at run time. The library never calls MPI: the
 * communicator arrives as a Fortran handle and mpi4py uses the MPI the program linked,
 * which insitu_start_mpi checks (and pins) before mpi4py.MPI is imported (insitu/mpilib.py).
 */
#define _GNU_SOURCE /* RTLD_DEFAULT, dladdr */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define INSITU_NO_MPI 1
#include "insitu.h"

#ifndef INSITU_PYTHON_DEFAULT
#error "build with -DINSITU_PYTHON_DEFAULT=\"/path/to/python\" (insitu build-shim does)"
#endif

#define MAGIC 0x1a5170u

enum bridge_state { LIVE = 0, DISABLED = 1, FINALIZED = 2 };

struct insitu_bridge {
    unsigned magic;
    enum bridge_state state;
    PyObject *handle; /* insitu.capi.CBridge */
};

static _Thread_local char last_error[2048];
static PyObject *capi = NULL; /* the insitu.capi module */
static int python_failed = 0;
static char mpi_refused[1900]; /* this rank's MPI check message ("" if it passed) */

/* The simulation's signals: whatever the embedded Python (or a module it imports) does,
 * these handlers are what the simulation set once an insitu call returns. */
static const int kept_signals[] = {SIGTERM, SIGINT, SIGUSR1, SIGUSR2};
#define N_KEPT (sizeof kept_signals / sizeof kept_signals[0])

struct saved_signals {
    struct sigaction action[N_KEPT];
    int ok[N_KEPT];
};

static void save_signals(struct saved_signals *s) {
    for (size_t i = 0; i < N_KEPT; i++) s->ok[i] = sigaction(kept_signals[i], NULL, &s->action[i]) == 0;
}

static void restore_signals(const struct saved_signals *s) {
    for (size_t i = 0; i < N_KEPT; i++)
        if (s->ok[i]) sigaction(kept_signals[i], &s->action[i], NULL);
}

static insitu_status_t fail(insitu_status_t status, const char *fmt, const char *arg) {
    snprintf(last_error, sizeof last_error, fmt, arg ? arg : "");
    return status;
}

static insitu_status_t ok(void) {
    last_error[0] = '\0';
    return INSITU_OK;
}

/* Start the interpreter of the environment insitu is installed in (once per process). */
static insitu_status_t ensure_python(void) {
    if (capi != NULL) return INSITU_OK;
    if (python_failed) return fail(INSITU_ERR_RUNTIME, "%s", "the embedded Python failed to start earlier");
    const char *python = getenv("INSITU_PYTHON");
    if (python == NULL || python[0] == '\0') python = INSITU_PYTHON_DEFAULT;
    int started_here = 0;
    if (!Py_IsInitialized()) {
        PyConfig config;
        PyConfig_InitPythonConfig(&config);
        config.install_signal_handlers = 0; /* the simulation keeps its signals */
        config.parse_argv = 0;
        PyStatus st = PyConfig_SetBytesString(&config, &config.program_name, python);
        if (!PyStatus_Exception(st)) st = PyConfig_SetBytesString(&config, &config.executable, python);
        if (!PyStatus_Exception(st)) st = Py_InitializeFromConfig(&config);
        PyConfig_Clear(&config);
        if (PyStatus_Exception(st)) {
            python_failed = 1;
            snprintf(last_error, sizeof last_error, "could not start the embedded Python %s: %s", python,
                     st.err_msg ? st.err_msg : "unknown error");
            return INSITU_ERR_RUNTIME;
        }
        started_here = 1;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    capi = PyImport_ImportModule("insitu.capi");
    insitu_status_t status = INSITU_OK;
    if (capi == NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *text = value ? PyObject_Str(value) : NULL;
        snprintf(last_error, sizeof last_error, "the embedded Python %s cannot import insitu: %s", python,
                 text ? PyUnicode_AsUTF8(text) : "unknown error");
        Py_XDECREF(text);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        PyErr_Clear();
        python_failed = 1;
        status = INSITU_ERR_RUNTIME;
    }
    PyGILState_Release(gil);
    if (started_here) PyEval_SaveThread(); /* let Ray's threads run between calls */
    return status;
}

/* Turn a (status, message, ...) result tuple into a status; NULL means Python raised. */
static insitu_status_t take_status(PyObject *result) {
    if (result == NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *text = value ? PyObject_Str(value) : NULL;
        snprintf(last_error, sizeof last_error, "internal error in insitu: %s",
                 text ? PyUnicode_AsUTF8(text) : "unknown");
        Py_XDECREF(text);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        PyErr_Clear();
        return INSITU_ERR_RUNTIME;
    }
    long status = PyLong_AsLong(PyTuple_GetItem(result, 0));
    const char *message = PyUnicode_AsUTF8(PyTuple_GetItem(result, 1));
    snprintf(last_error, sizeof last_error, "%s", message ? message : "");
    if (PyErr_Occurred()) PyErr_Clear();
    return (insitu_status_t)status;
}

static int fatal(insitu_status_t s) {
    return s == INSITU_ERR_CONTRACT || s == INSITU_ERR_TIMEOUT || s == INSITU_ERR_ANALYTICS ||
           s == INSITU_ERR_RUNTIME;
}

static PyObject *shape_tuple(const int64_t *v, int ndim) {
    if (v == NULL || ndim < 1 || ndim > INSITU_MAX_NDIM) Py_RETURN_NONE;
    PyObject *t = PyTuple_New(ndim);
    for (int i = 0; i < ndim; i++) PyTuple_SET_ITEM(t, i, PyLong_FromLongLong(v[i]));
    return t;
}

static PyObject *str_or_none(const char *s) {
    if (s == NULL) Py_RETURN_NONE;
    PyObject *o = PyUnicode_DecodeUTF8(s, (Py_ssize_t)strlen(s), "replace");
    return o;
}

/* NULL bridge, a pointer that is not a bridge, or one already finalized. */
static insitu_status_t check_bridge(const insitu_bridge_t *b) {
    if (b == NULL) return fail(INSITU_ERR_STATE, "%s", "no bridge: call insitu_init first (or it was finalized)");
    if (b->magic != MAGIC) return fail(INSITU_ERR_ARG, "%s", "the bridge pointer does not point to an insitu bridge");
    if (b->state == FINALIZED) return fail(INSITU_ERR_STATE, "%s", "the bridge was finalized");
    if (b->state == DISABLED) return fail(INSITU_DISABLED, "%s", "insitu is disabled after an earlier fatal error");
    return INSITU_OK;
}

insitu_status_t insitu_version(int *major, int *minor, int *patch) {
    if (major) *major = INSITU_VERSION_MAJOR;
    if (minor) *minor = INSITU_VERSION_MINOR;
    if (patch) *patch = INSITU_VERSION_PATCH;
    return ok();
}

insitu_status_t insitu_check_version(int header_major, int header_minor) {
    if (header_major != INSITU_VERSION_MAJOR || header_minor > INSITU_VERSION_MINOR) {
        char buf[128];
        snprintf(buf, sizeof buf, "compiled against insitu.h %d.%d; the library is %s", header_major,
                 header_minor, INSITU_VERSION_STRING);
        return fail(INSITU_ERR_VERSION, "%s", buf);
    }
    return ok();
}

const char *insitu_last_error(void) { return last_error; }

const char *insitu_status_name(insitu_status_t status) {
    static const char *names[] = {"INSITU_OK",           "INSITU_ERR_NULL",     "INSITU_ERR_ARG",
                                  "INSITU_ERR_NAME",     "INSITU_ERR_SIZE",     "INSITU_ERR_DTYPE",
                                  "INSITU_ERR_STATE",    "INSITU_ERR_SEND",     "INSITU_ERR_CONTRACT",
                                  "INSITU_ERR_TIMEOUT",  "INSITU_ERR_ANALYTICS", "INSITU_ERR_RUNTIME",
                                  "INSITU_ERR_VERSION",  "INSITU_DISABLED",     "INSITU_ERR_MPI_MISMATCH"};
    if ((int)status < 0 || (size_t)status >= sizeof names / sizeof names[0]) return "INSITU_UNKNOWN_STATUS";
    return names[status];
}

insitu_status_t insitu_start(void) {
    struct saved_signals saved;
    save_signals(&saved);
    insitu_status_t status = ensure_python();
    restore_signals(&saved);
    if (status == INSITU_OK) return ok();
    return status;
}

/* *bridge = a disabled bridge (every later call returns INSITU_DISABLED). */
static void disabled_bridge(insitu_bridge_t **bridge) {
    if (bridge == NULL) return;
    insitu_bridge_t *b = calloc(1, sizeof *b);
    if (b != NULL) {
        b->magic = MAGIC;
        b->state = DISABLED;
    }
    *bridge = b;
}

insitu_status_t insitu_start_failed(int failed_rank, insitu_bridge_t **bridge) {
    char mine[1536];
    snprintf(mine, sizeof mine, "%s", python_failed ? last_error : "");
    snprintf(last_error, sizeof last_error,
             "rank %d: the embedded Python could not start%s%s; insitu is disabled for the rest of the run",
             failed_rank, mine[0] ? ": " : "", mine);
    disabled_bridge(bridge);
    fprintf(stderr, "insitu: error: %s\n", last_error);
    return INSITU_ERR_RUNTIME;
}

static PyObject *path_or_none(const void *symbol) {
    Dl_info info;
    if (symbol == NULL || dladdr(symbol, &info) == 0 || info.dli_fname == NULL) Py_RETURN_NONE;
    return str_or_none(info.dli_fname);
}

/* Which libmpi mpi4py's MPI extension needs (Python), whether that name already denotes a
 * loaded object (dlopen RTLD_NOLOAD from here, whose run path starts with the shim directory
 * and its libmpi.so.12 link: never loads anything, and pins the name to the object found),
 * and whether that object is the program's (the one defining MPI_Get_library_version in the
 * global scope); insitu.capi.check_mpi gives the verdict. */
static insitu_status_t check_mpi(const char *program_version) {
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *need = PyObject_CallMethod(capi, "mpi_needed", NULL);
    insitu_status_t status = take_status(need);
    if (status == INSITU_OK && PyTuple_Size(need) == 4) {
        PyObject *extension = PyTuple_GetItem(need, 2), *soname = PyTuple_GetItem(need, 3);
        void *program = dlsym(RTLD_DEFAULT, "MPI_Get_library_version");
        void *handle = dlopen(PyUnicode_AsUTF8(soname), RTLD_LAZY | RTLD_NOLOAD);
        void *theirs = handle ? dlsym(handle, "MPI_Get_library_version") : NULL;
        PyObject *loaded = handle == NULL ? Py_NewRef(Py_None) : theirs ? path_or_none(theirs) : Py_NewRef(soname);
        PyObject *result = PyObject_CallMethod(capi, "check_mpi", "NNONNi", str_or_none(program_version),
                                               path_or_none(program), extension, Py_NewRef(soname), loaded,
                                               program != NULL && theirs == program);
        status = take_status(result);
        Py_XDECREF(result);
    }
    Py_XDECREF(need);
    PyGILState_Release(gil);
    snprintf(mpi_refused, sizeof mpi_refused, "%s", status == INSITU_OK ? "" : last_error);
    return status;
}

insitu_status_t insitu_start_mpi(const char *program_version) {
    struct saved_signals saved;
    save_signals(&saved);
    insitu_status_t status = ensure_python();
    if (status == INSITU_OK) status = check_mpi(program_version);
    restore_signals(&saved);
    return status == INSITU_OK ? ok() : status;
}

insitu_status_t insitu_start_agreed(int rank, int python_rank, int mpi_rank, insitu_bridge_t **bridge) {
    if (python_rank != INT_MAX) return insitu_start_failed(python_rank, bridge);
    if (mpi_rank == INT_MAX) return ok();
    if (mpi_refused[0] != '\0')
        snprintf(last_error, sizeof last_error, "one MPI per process: rank %d: %s; insitu is disabled for the rest "
                 "of the run", rank, mpi_refused);
    else
        snprintf(last_error, sizeof last_error, "one MPI per process: rank %d's embedded mpi4py would not use its "
                 "program's MPI library (see its message); insitu is disabled for the rest of the run", mpi_rank);
    disabled_bridge(bridge);
    if (rank == mpi_rank) fprintf(stderr, "insitu: error: %s\n", last_error);
    return INSITU_ERR_MPI_MISMATCH;
}

static insitu_status_t init_f(int comm_f, const char *run, int narrays, const insitu_array_decl_t *arrays,
                              insitu_bridge_t **bridge);

insitu_status_t insitu_init_f(int comm_f, const char *run, int narrays, const insitu_array_decl_t *arrays,
                              insitu_bridge_t **bridge) {
    struct saved_signals saved;
    save_signals(&saved);
    insitu_status_t status = init_f(comm_f, run, narrays, arrays, bridge);
    restore_signals(&saved);
    return status;
}

static insitu_status_t init_f(int comm_f, const char *run, int narrays, const insitu_array_decl_t *arrays,
                              insitu_bridge_t **bridge) {
    if (bridge == NULL) return fail(INSITU_ERR_NULL, "%s", "bridge (the output pointer) is NULL");
    *bridge = NULL;
    insitu_bridge_t *b = calloc(1, sizeof *b);
    if (b == NULL) return fail(INSITU_ERR_RUNTIME, "%s", "out of memory");
    b->magic = MAGIC;
    b->state = DISABLED;
    *bridge = b;
    insitu_status_t status = ensure_python();
    if (status != INSITU_OK) {
        /* no Python: nothing can be collective; every rank fails the same way here */
        fprintf(stderr, "insitu: error: %s; insitu is disabled for the rest of the run\n", last_error);
        return status;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *decls;
    if (arrays == NULL) {
        decls = Py_NewRef(Py_None);
    } else {
        decls = PyList_New(0);
        for (int i = 0; i < narrays; i++) {
            const insitu_array_decl_t *d = &arrays[i];
            PyObject *item = Py_BuildValue("(NiiNNN)", str_or_none(d->name), (int)d->dtype, d->ndim,
                                           shape_tuple(d->global_shape, d->ndim),
                                           shape_tuple(d->local_shape, d->ndim), shape_tuple(d->start, d->ndim));
            PyList_Append(decls, item);
            Py_DECREF(item);
        }
    }
    PyObject *result = PyObject_CallMethod(capi, "init", "iNN", comm_f, str_or_none(run), decls);
    status = take_status(result);
    if (result != NULL) {
        PyObject *handle = PyTuple_Size(result) == 3 ? PyTuple_GetItem(result, 2) : NULL;
        if (handle != NULL) b->handle = Py_NewRef(handle);
        else if (status == INSITU_OK) status = fail(INSITU_ERR_RUNTIME, "%s", "internal error: no handle from insitu");
        Py_DECREF(result);
    }
    PyGILState_Release(gil);
    if (status == INSITU_OK) b->state = LIVE;
    return status;
}

insitu_status_t insitu_send(insitu_bridge_t *bridge, int64_t step, int nfields, const insitu_field_t *fields) {
    insitu_status_t status = check_bridge(bridge);
    if (status != INSITU_OK) return status;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *list;
    if (fields == NULL) {
        list = Py_NewRef(Py_None);
    } else {
        list = PyList_New(0);
        for (int i = 0; i < nfields; i++) {
            const insitu_field_t *f = &fields[i];
            PyObject *item = Py_BuildValue("(NKiiiNNNL)", str_or_none(f->name),
                                           (unsigned long long)(uintptr_t)f->data, (int)f->dtype, (int)f->order,
                                           f->ndim, shape_tuple(f->mem_shape, f->ndim),
                                           shape_tuple(f->sel_start, f->ndim), shape_tuple(f->sel_count, f->ndim),
                                           (long long)f->nelems);
            PyList_Append(list, item);
            Py_DECREF(item);
        }
    }
    PyObject *result = PyObject_CallMethod(capi, "send", "OLN", bridge->handle, (long long)step, list);
    status = take_status(result);
    Py_XDECREF(result);
    PyGILState_Release(gil);
    if (fatal(status) || status == INSITU_DISABLED) bridge->state = DISABLED;
    return status;
}

/* kind: 0 int, 1 double, 2 string (insitu.capi.SteeringKind) */
static insitu_status_t get_value(insitu_bridge_t *bridge, const char *key, int kind, void *value, size_t len,
                                 int *found) {
    insitu_status_t status = check_bridge(bridge);
    if (status != INSITU_OK) return status;
    if (value == NULL) return fail(INSITU_ERR_NULL, "%s", "value (the output pointer) is NULL");
    if (found == NULL) return fail(INSITU_ERR_NULL, "%s", "found (the output pointer) is NULL");
    *found = 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *result = PyObject_CallMethod(capi, "get", "ONi", bridge->handle, str_or_none(key), kind);
    status = take_status(result);
    if (result != NULL && status == INSITU_OK && PyLong_AsLong(PyTuple_GetItem(result, 2)) == 1) {
        PyObject *v = PyTuple_GetItem(result, 3);
        if (kind == 0) {
            *(int64_t *)value = (int64_t)PyLong_AsLongLong(v);
        } else if (kind == 1) {
            *(double *)value = PyFloat_AsDouble(v);
        } else {
            char *out = value;
            size_t n = (size_t)PyBytes_Size(v);
            if (len == 0) {
                status = fail(INSITU_ERR_SIZE, "%s", "len is 0");
            } else {
                size_t copy = n < len - 1 ? n : len - 1;
                memcpy(out, PyBytes_AsString(v), copy);
                out[copy] = '\0';
                if (copy < n) status = fail(INSITU_ERR_SIZE, "steering value %s was truncated", key);
            }
        }
        *found = 1;
    }
    Py_XDECREF(result);
    PyGILState_Release(gil);
    return status;
}

insitu_status_t insitu_get_int(insitu_bridge_t *bridge, const char *key, int64_t *value, int *found) {
    return get_value(bridge, key, 0, value, 0, found);
}

insitu_status_t insitu_get_double(insitu_bridge_t *bridge, const char *key, double *value, int *found) {
    return get_value(bridge, key, 1, value, 0, found);
}

insitu_status_t insitu_get_string(insitu_bridge_t *bridge, const char *key, char *value, size_t len, int *found) {
    return get_value(bridge, key, 2, value, len, found);
}

insitu_status_t insitu_finalize(insitu_bridge_t **bridge) {
    if (bridge == NULL) return fail(INSITU_ERR_NULL, "%s", "bridge (the pointer to the handle) is NULL");
    insitu_bridge_t *b = *bridge;
    if (b == NULL) return fail(INSITU_ERR_STATE, "%s", "no bridge: never initialised or already finalized");
    if (b->magic != MAGIC) return fail(INSITU_ERR_ARG, "%s", "the bridge pointer does not point to an insitu bridge");
    if (b->state == FINALIZED) return fail(INSITU_ERR_STATE, "%s", "the bridge was already finalized");
    insitu_status_t status = ok();
    if (b->handle != NULL) {
        struct saved_signals saved;
        save_signals(&saved);
        PyGILState_STATE gil = PyGILState_Ensure();
        PyObject *result = PyObject_CallMethod(capi, "finalize", "O", b->handle);
        status = take_status(result);
        Py_XDECREF(result);
        Py_CLEAR(b->handle);
        PyGILState_Release(gil);
        restore_signals(&saved);
    }
    /* the few bytes of the handle are kept so that a stale copy of the pointer gets
     * INSITU_ERR_STATE instead of a use-after-free */
    b->state = FINALIZED;
    *bridge = NULL;
    return status;
}
