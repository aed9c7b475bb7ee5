/*
 * insitu.h -- couple a C or C++ MPI simulation to insitu (in-situ analytics on Ray).
 *
 * Usage (see docs/coupling-c-fortran.md):
 *
 *     insitu_array_decl_t decl = { "temperature", INSITU_FLOAT64, 2, gshape, lshape, start };
 *     insitu_bridge_t *b = NULL;
 *     insitu_init(comm, "run-name", 1, &decl, &b);       // collective
 *     for (step...) {
 *         insitu_field_t f = { "temperature", u, INSITU_FLOAT64, INSITU_ORDER_C, 2, mem, sel_start, sel_count, n };
 *         insitu_send(b, step, 1, &f);                  // collective
 *         insitu_get_int(b, "stop", &stop, &found);     // local
 *     }
 *     insitu_finalize(&b);                               // local: no MPI call
 *
 * Build:  cc $(insitu config --cflags) sim.c $(insitu config --libs)
 * Stub:   cc -DINSITU_STUB -I<dir of this header> sim.c   (no insitu, no Python: every call is a no-op)
 *
 * Conventions
 * - Every function returns an insitu_status_t; 0 (INSITU_OK) is success.
 * - insitu_last_error() gives the message of the calling thread's last failed call.
 * - After a fatal error (the cluster is unreachable, the analytics failed under the
 *   "raise" policy, a deadline passed, declarations inconsistent across ranks) the call
 *   returns its error status and every later call is a no-op returning INSITU_DISABLED,
 *   so the simulation can finish its run without insitu. Bad input to insitu_send is not
 *   fatal: the step is rejected on every rank and the run goes on.
 * - Each function says whether it is MPI-collective (every rank of the communicator
 *   passed to insitu_init must call it, in the same order) and when the caller may reuse
 *   or free the memory it passed.
 * - libinsitu never calls MPI_Init or MPI_Finalize: initialise MPI before insitu_init and
 *   finalise it after insitu_finalize. MPI is only called from the thread calling insitu.
 * - Not thread-safe: call insitu from one thread per process.
 */
#ifndef INSITU_H
#define INSITU_H

#include <stddef.h>
#include <stdint.h>

#define INSITU_VERSION_MAJOR 0
#define INSITU_VERSION_MINOR 2
#define INSITU_VERSION_PATCH 0
#define INSITU_VERSION_STRING "0.2.0"

/** Maximum number of dimensions of an array. */
#define INSITU_MAX_NDIM 8

#ifdef __cplusplus
extern "C" {
#endif

/** Status of every call; 0 is success. */
typedef enum insitu_status {
    INSITU_OK = 0,
    INSITU_ERR_NULL = 1,      /**< a required pointer argument is NULL */
    INSITU_ERR_ARG = 2,       /**< an argument is out of range (ndim, dtype or order code, empty name) */
    INSITU_ERR_NAME = 3,      /**< unknown array name (not declared at init) */
    INSITU_ERR_SIZE = 4,      /**< element count, shape or memory selection does not match */
    INSITU_ERR_DTYPE = 5,     /**< element type differs from the declaration / steering value of another type */
    INSITU_ERR_STATE = 6,     /**< call before insitu_init, after insitu_finalize, or a second finalize */
    INSITU_ERR_SEND = 7,      /**< another rank's input was rejected: the step was published nowhere */
    INSITU_ERR_CONTRACT = 8,  /**< declarations inconsistent across ranks (fatal) */
    INSITU_ERR_TIMEOUT = 9,   /**< a deadline passed (fatal) */
    INSITU_ERR_ANALYTICS = 10, /**< the analytics failed and the policy is "raise" (fatal) */
    INSITU_ERR_RUNTIME = 11,  /**< cluster unreachable, embedded Python or Ray failure (fatal) */
    INSITU_ERR_VERSION = 12,  /**< header and library versions are incompatible */
    INSITU_DISABLED = 13,     /**< insitu was disabled by an earlier fatal error: the call did nothing */
    INSITU_ERR_MPI_MISMATCH = 14 /**< the embedded mpi4py would not use the program's MPI library (fatal) */
} insitu_status_t;

/** Element types. */
typedef enum insitu_dtype {
    INSITU_FLOAT64 = 0,
    INSITU_FLOAT32 = 1,
    INSITU_INT64 = 2,
    INSITU_INT32 = 3,
    INSITU_UINT8 = 4,
    INSITU_INT8 = 5 /**< signed bytes (Fortran integer(int8)) */
} insitu_dtype_t;

/** Memory order of a field: C (row-major, last index fastest) or Fortran (column-major). */
typedef enum insitu_order { INSITU_ORDER_C = 0, INSITU_ORDER_F = 1 } insitu_order_t;

/** Opaque bridge handle. */
typedef struct insitu_bridge insitu_bridge_t;

/**
 * Declaration of one array, made once at init.
 * global_shape: the whole array. local_shape: this rank's block (all zeros: no block).
 * start: global 0-based index of the block's first element; NULL to derive it from the
 * communicator's Cartesian topology (the communicator must then be Cartesian, and blocks
 * are placed by coordinates; uneven splits are allowed).
 */
typedef struct insitu_array_decl {
    const char *name;
    insitu_dtype_t dtype;
    int ndim;
    const int64_t *global_shape;
    const int64_t *local_shape;
    const int64_t *start;
} insitu_array_decl_t;

/**
 * One field of one step, sent as it sits in memory (ghost cells included).
 * data: first element of the allocated buffer; nelems: its element count (checked against
 * the product of mem_shape). mem_shape: the allocated shape; sel_start / sel_count: the
 * interior to send (0-based, in memory axis order), as a memory selection in ADIOS2.
 * sel_count must equal the declared local_shape. With INSITU_ORDER_F the shapes are
 * given in Fortran index order (first index fastest in memory).
 */
typedef struct insitu_field {
    const char *name;
    const void *data;
    insitu_dtype_t dtype;
    insitu_order_t order;
    int ndim;
    const int64_t *mem_shape;
    const int64_t *sel_start;
    const int64_t *sel_count;
    int64_t nelems;
} insitu_field_t;

#ifdef INSITU_STUB
#ifdef __cplusplus
}
#endif
#include "insitu_stub.h"
#else /* the real library */

/* Runtime version of the library; any pointer may be NULL. Not collective. */
insitu_status_t insitu_version(int *major, int *minor, int *patch);

/* INSITU_ERR_VERSION unless the library is compatible with the header this code was
 * compiled with (same major, library minor >= header minor). Not collective. */
insitu_status_t insitu_check_version(int header_major, int header_minor);
#define INSITU_CHECK_VERSION() insitu_check_version(INSITU_VERSION_MAJOR, INSITU_VERSION_MINOR)

/* Message of the calling thread's last failed call ("" if none). Valid until the next
 * insitu call on this thread. Not collective. */
const char *insitu_last_error(void);

/* Name of a status code (static string). Not collective. */
const char *insitu_status_name(insitu_status_t status);

/*
 * Start the embedded Python of this process (once; later calls return at once). Not
 * collective. insitu_init calls it on every rank and agrees on the outcome with one
 * MPI_Allreduce before anything else, so a rank whose Python cannot start (e.g. a bad
 * INSITU_PYTHON) fails insitu_init on every rank, never alone. The simulation's handlers
 * of SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 are left as they were (CPython installs none).
 */
insitu_status_t insitu_start(void);

/*
 * Make *bridge a disabled bridge because the embedded Python of rank `failed_rank` could
 * not start; returns INSITU_ERR_RUNTIME with a message naming that rank. Called by
 * insitu_init on every rank after the agreement on insitu_start; not collective itself.
 */
insitu_status_t insitu_start_failed(int failed_rank, insitu_bridge_t **bridge);

/*
 * Start the embedded Python of this process (insitu_start) and check, without importing
 * mpi4py.MPI, that the MPI library the embedded mpi4py would use is the program's own:
 * `program_version` is the program's MPI_Get_library_version string. Not collective.
 * Returns INSITU_OK, INSITU_ERR_RUNTIME (no Python) or INSITU_ERR_MPI_MISMATCH (a second
 * MPI library would be loaded, or the program's MPI is not of the MPICH ABI family; the
 * message names both libraries). insitu_init calls it on every rank before anything else.
 */
insitu_status_t insitu_start_mpi(const char *program_version);

/*
 * The outcome of the agreement on insitu_start_mpi (one MPI_Allreduce(MIN) of two ranks,
 * INT_MAX for none): python_rank, the lowest rank whose Python could not start;
 * mpi_rank, the lowest rank refused by the MPI check. Returns INSITU_OK when both are
 * INT_MAX; otherwise makes *bridge a disabled bridge and returns INSITU_ERR_RUNTIME or
 * INSITU_ERR_MPI_MISMATCH (message logged by the rank named). Not collective itself.
 */
insitu_status_t insitu_start_agreed(int rank, int python_rank, int mpi_rank, insitu_bridge_t **bridge);

/*
 * Start insitu on communicator `comm_f` (a Fortran handle: MPI_Comm_c2f(comm); use the
 * insitu_init macro from C). COLLECTIVE over comm. Connects to the Ray cluster named by
 * INSITU_ADDRESS (see `insitu config`), checks the declarations of all ranks and sets
 * *bridge. run: run name shared with the analytics (NULL: INSITU_RUN or the SLURM job).
 * The declarations and all pointers in them may be freed when the call returns.
 * On a fatal error *bridge is still set, to a disabled bridge: later calls return
 * INSITU_DISABLED; call insitu_finalize to release it.
 */
insitu_status_t insitu_init_f(int comm_f, const char *run, int narrays, const insitu_array_decl_t *arrays,
                              insitu_bridge_t **bridge);

/*
 * Hand this rank's blocks of `step` to the analytics. COLLECTIVE over the init
 * communicator (all ranks, same step, increasing). The data are copied once before the
 * call returns: the caller may modify or free its buffers right after.
 * Bad input (NULL data, unknown name, size or dtype mismatch) rejects the step on every
 * rank: this rank gets the specific status, the others INSITU_ERR_SEND.
 */
insitu_status_t insitu_send(insitu_bridge_t *bridge, int64_t step, int nfields, const insitu_field_t *fields);

/*
 * Steering values set by the analytics, as agreed by all ranks at the last insitu_send
 * (the same value at the same step on every rank). Not collective, never blocks.
 * *found = 0 and the value is left untouched when the key was never set.
 * insitu_get_string copies at most len-1 bytes plus a NUL (INSITU_ERR_SIZE if truncated).
 * A value of another type gives INSITU_ERR_DTYPE (booleans read as integers).
 */
insitu_status_t insitu_get_int(insitu_bridge_t *bridge, const char *key, int64_t *value, int *found);
insitu_status_t insitu_get_double(insitu_bridge_t *bridge, const char *key, double *value, int *found);
insitu_status_t insitu_get_string(insitu_bridge_t *bridge, const char *key, char *value, size_t len, int *found);

/*
 * End the stream for this rank and release the bridge; sets *bridge to NULL. Not
 * collective and makes no MPI call (one rank may finalize while others still run or
 * failed): the bridge's duplicate of the communicator is released by MPI_Finalize. Returns once the data this
 * rank sent are held by its node; safe to call on a disabled bridge. A second call with
 * the same (now NULL) pointer returns INSITU_ERR_STATE.
 */
insitu_status_t insitu_finalize(insitu_bridge_t **bridge);

#ifdef __cplusplus
}
#endif

#ifndef INSITU_NO_MPI /* defined only when building libinsitu itself, which never calls MPI */
#include <limits.h>
#include <mpi.h>
/* C entry point taking an MPI_Comm. COLLECTIVE (see insitu_init_f): every rank starts its
 * embedded Python and checks that mpi4py will use the program's MPI library
 * (insitu_start_mpi), and the ranks agree on both outcomes with one MPI_Allreduce before
 * anything calls mpi4py's MPI: one rank whose Python cannot start fails every rank with
 * INSITU_ERR_RUNTIME, one refused by the MPI check with INSITU_ERR_MPI_MISMATCH, naming the
 * lowest such rank. */
static inline insitu_status_t insitu_init(MPI_Comm comm, const char *run, int narrays,
                                          const insitu_array_decl_t *arrays, insitu_bridge_t **bridge) {
    char version[MPI_MAX_LIBRARY_VERSION_STRING + 1] = "";
    int rank = 0, len = 0, mine[2] = {INT_MAX, INT_MAX}, first[2] = {INT_MAX, INT_MAX};
    MPI_Comm_rank(comm, &rank);
    MPI_Get_library_version(version, &len);
    insitu_status_t started = insitu_start_mpi(version);
    if (started == INSITU_ERR_MPI_MISMATCH) mine[1] = rank;
    else if (started != INSITU_OK) mine[0] = rank;
    MPI_Allreduce(mine, first, 2, MPI_INT, MPI_MIN, comm);
    if (first[0] != INT_MAX || first[1] != INT_MAX) return insitu_start_agreed(rank, first[0], first[1], bridge);
    return insitu_init_f((int)MPI_Comm_c2f(comm), run, narrays, arrays, bridge);
}
#endif
#endif /* INSITU_STUB */

#endif /* INSITU_H */
