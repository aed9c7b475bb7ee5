/*
 * insitu_stub.h -- header-only no-op insitu, selected by compiling with -DINSITU_STUB.
 *
 * A code built this way needs neither libinsitu nor Python: insitu_init gives a non-NULL
 * dummy handle, insitu_send does nothing, steering values are never found, and every call
 * returns INSITU_OK. Included by insitu.h; do not include it directly.
 */
#ifndef INSITU_STUB_H
#define INSITU_STUB_H

#ifndef INSITU_H
#error "include insitu.h (compiled with -DINSITU_STUB), not insitu_stub.h"
#endif

static char insitu_stub_handle_;

static inline insitu_status_t insitu_version(int *major, int *minor, int *patch) {
    if (major) *major = INSITU_VERSION_MAJOR;
    if (minor) *minor = INSITU_VERSION_MINOR;
    if (patch) *patch = INSITU_VERSION_PATCH;
    return INSITU_OK;
}
static inline insitu_status_t insitu_check_version(int header_major, int header_minor) {
    (void)header_major; (void)header_minor;
    return INSITU_OK;
}
#define INSITU_CHECK_VERSION() insitu_check_version(INSITU_VERSION_MAJOR, INSITU_VERSION_MINOR)
static inline const char *insitu_last_error(void) { return ""; }
static inline const char *insitu_status_name(insitu_status_t status) { (void)status; return "INSITU_OK"; }
static inline insitu_status_t insitu_start(void) { return INSITU_OK; }
static inline insitu_status_t insitu_start_failed(int failed_rank, insitu_bridge_t **bridge) {
    (void)failed_rank;
    if (bridge) *bridge = (insitu_bridge_t *)(void *)&insitu_stub_handle_;
    return INSITU_OK;
}
static inline insitu_status_t insitu_start_mpi(const char *program_version) {
    (void)program_version;
    return INSITU_OK;
}
static inline insitu_status_t insitu_start_agreed(int rank, int python_rank, int mpi_rank, insitu_bridge_t **bridge) {
    (void)rank; (void)python_rank; (void)mpi_rank;
    if (bridge) *bridge = (insitu_bridge_t *)(void *)&insitu_stub_handle_;
    return INSITU_OK;
}
static inline insitu_status_t insitu_init_f(int comm_f, const char *run, int narrays,
                                            const insitu_array_decl_t *arrays, insitu_bridge_t **bridge) {
    (void)comm_f; (void)run; (void)narrays; (void)arrays;
    if (bridge) *bridge = (insitu_bridge_t *)(void *)&insitu_stub_handle_;
    return INSITU_OK;
}
/* the stub takes any communicator type: no MPI header needed */
#define insitu_init(comm, run, narrays, arrays, bridge) ((void)(comm), insitu_init_f(0, (run), (narrays), (arrays), (bridge)))
static inline insitu_status_t insitu_send(insitu_bridge_t *bridge, int64_t step, int nfields,
                                          const insitu_field_t *fields) {
    (void)bridge; (void)step; (void)nfields; (void)fields;
    return INSITU_OK;
}
static inline insitu_status_t insitu_get_int(insitu_bridge_t *bridge, const char *key, int64_t *value, int *found) {
    (void)bridge; (void)key; (void)value;
    if (found) *found = 0;
    return INSITU_OK;
}
static inline insitu_status_t insitu_get_double(insitu_bridge_t *bridge, const char *key, double *value, int *found) {
    (void)bridge; (void)key; (void)value;
    if (found) *found = 0;
    return INSITU_OK;
}
static inline insitu_status_t insitu_get_string(insitu_bridge_t *bridge, const char *key, char *value, size_t len,
                                                int *found) {
    (void)bridge; (void)key; (void)value; (void)len;
    if (found) *found = 0;
    return INSITU_OK;
}
static inline insitu_status_t insitu_finalize(insitu_bridge_t **bridge) {
    if (bridge) *bridge = NULL;
    return INSITU_OK;
}

#endif /* INSITU_STUB_H */
