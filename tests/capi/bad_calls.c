/* Every bad call of the C API, on a live cluster: prints "<case> <status name> <rank>" per call. */
#include <stdio.h>
#include <string.h>

#include <mpi.h>

#include "insitu.h"

static int rank;

/* Whether a mapped file of this process has `needle` in its path (/proc/self/maps). */
static int mapped(const char *needle) {
    char line[4096];
    int found = 0;
    FILE *maps = fopen("/proc/self/maps", "r");
    if (maps == NULL) return -1;
    while (!found && fgets(line, sizeof line, maps) != NULL) found = strstr(line, needle) != NULL;
    fclose(maps);
    return found;
}

static void report(const char *what, insitu_status_t s) {
    printf("%s %s %d | %s\n", what, insitu_status_name(s), rank, s == INSITU_OK ? "" : insitu_last_error());
    fflush(stdout);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *run = argc > 1 ? argv[1] : NULL;
    double u[6 * 5] = {0};
    float uf[6 * 5] = {0};
    int64_t value = 0;
    int found = 0;
    char text[8];

    /* before init */
    insitu_bridge_t *none = NULL;
    report("send_before_init", insitu_send(NULL, 0, 0, NULL));
    report("get_before_init", insitu_get_int(NULL, "stop", &value, &found));
    report("finalize_before_init", insitu_finalize(&none));
    report("finalize_null", insitu_finalize(NULL));
    report("init_null_out", insitu_init(MPI_COMM_WORLD, run, 0, NULL, NULL));
    report("version_ok", INSITU_CHECK_VERSION());
    report("version_bad", insitu_check_version(99, 0));

    /* each rank owns a 4x3 block of an (4*size)x3 array, stored with one ghost layer: 6x5 */
    const int64_t g[2] = {4 * size, 3}, l[2] = {4, 3}, start[2] = {4 * rank, 0};
    const insitu_array_decl_t decl = {"u", INSITU_FLOAT64, 2, g, l, start};
    insitu_bridge_t *b = NULL;
    report("init", insitu_init(MPI_COMM_WORLD, run, 1, &decl, &b));

    const int64_t mem[2] = {6, 5}, s0[2] = {1, 1}, cnt[2] = {4, 3}, badcnt[2] = {4, 2}, big[2] = {3, 3};
    insitu_field_t good = {"u", u, INSITU_FLOAT64, INSITU_ORDER_C, 2, mem, s0, cnt, 30};
    insitu_field_t f;
    report("send_fields_null", insitu_send(b, 0, 1, NULL));
    f = good; f.data = NULL;
    report("send_data_null", insitu_send(b, 0, 1, &f));
    f = good; f.name = "nope";
    report("send_unknown_name", insitu_send(b, 0, 1, &f));
    f = good; f.nelems = 29;
    report("send_wrong_nelems", insitu_send(b, 0, 1, &f));
    f = good; f.sel_count = badcnt;
    report("send_wrong_count", insitu_send(b, 0, 1, &f));
    f = good; f.sel_start = big;
    report("send_selection_outside", insitu_send(b, 0, 1, &f));
    f = good; f.data = uf; f.dtype = INSITU_FLOAT32;
    report("send_wrong_dtype", insitu_send(b, 0, 1, &f));
    f = good; f.ndim = 99;
    report("send_bad_ndim", insitu_send(b, 0, 1, &f));
    f = good; if (rank == size - 1) f.nelems = 7; /* one rank only */
    report("send_one_rank_wrong", insitu_send(b, 0, 1, &f));
    report("send_good", insitu_send(b, 0, 1, &good));
    /* after init and a send, the process embeds CPython (libpython) but never loads Ray */
    printf("mapped libpython %d %d\n", mapped("libpython"), rank);
    printf("mapped _raylet %d %d\n", mapped("_raylet"), rank);
    fflush(stdout);
    report("send_step_not_increasing", insitu_send(b, 0, 1, &good));
    report("get_null_key", insitu_get_int(b, NULL, &value, &found));
    report("get_null_value", insitu_get_string(b, "stop", NULL, 8, &found));
    report("get_unset_key", insitu_get_int(b, "never-set", &value, &found));
    printf("found_unset %d %d\n", found, rank);
    (void)text;

    insitu_bridge_t *stale = b;
    report("finalize", insitu_finalize(&b));
    printf("handle_after_finalize %s %d\n", b == NULL ? "NULL" : "set", rank);
    report("finalize_again", insitu_finalize(&b));
    report("finalize_stale", insitu_finalize(&stale));
    report("send_after_finalize", insitu_send(stale, 1, 1, &good));
    report("get_after_finalize", insitu_get_double(stale, "x", (double *)u, &found));
    MPI_Finalize();
    return 0;
}
