/*
 * heat2d.c -- the heat2d simulation of examples/python/heat2d.py in C, coupled to insitu.
 *
 * Same grid, initial condition, stencil and decomposition as the Python version, so the
 * same analytics (analytics/heat_stats.py) sees the same field. The insitu calls are the
 * ones marked "insitu:"; everything else is an ordinary MPI code.
 *
 * Build:  mpicc -O2 heat2d.c $(insitu config --cflags) $(insitu config --libs) -lm -o heat2d
 * Run:    mpiexec -n 4 ./heat2d --run demo --nx 128 --ny 128 --steps 100
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "insitu.h"

static void split(int n, int parts, int index, int *start, int *size) {
    int base = n / parts, extra = n % parts;
    *size = base + (index < extra ? 1 : 0);
    *start = index * base + (index < extra ? index : extra);
}

/* ghost layers from the four neighbours; the plate's edges stay at 0 */
static void exchange(MPI_Comm cart, double *u, int lx, int ly, double *sbuf, double *rbuf) {
    const int nyg = ly + 2;
    int lo, hi;
    /* axis 0: rows are contiguous */
    MPI_Cart_shift(cart, 0, 1, &lo, &hi);
    memset(rbuf, 0, sizeof(double) * nyg);
    MPI_Sendrecv(&u[lx * nyg], nyg, MPI_DOUBLE, hi, 0, rbuf, nyg, MPI_DOUBLE, lo, 0, cart, MPI_STATUS_IGNORE);
    memcpy(&u[0], rbuf, sizeof(double) * nyg);
    memset(rbuf, 0, sizeof(double) * nyg);
    MPI_Sendrecv(&u[1 * nyg], nyg, MPI_DOUBLE, lo, 1, rbuf, nyg, MPI_DOUBLE, hi, 1, cart, MPI_STATUS_IGNORE);
    memcpy(&u[(lx + 1) * nyg], rbuf, sizeof(double) * nyg);
    /* axis 1: columns are packed */
    const int nxg = lx + 2;
    MPI_Cart_shift(cart, 1, 1, &lo, &hi);
    for (int i = 0; i < nxg; i++) sbuf[i] = u[i * nyg + ly];
    memset(rbuf, 0, sizeof(double) * nxg);
    MPI_Sendrecv(sbuf, nxg, MPI_DOUBLE, hi, 2, rbuf, nxg, MPI_DOUBLE, lo, 2, cart, MPI_STATUS_IGNORE);
    for (int i = 0; i < nxg; i++) u[i * nyg + 0] = rbuf[i];
    for (int i = 0; i < nxg; i++) sbuf[i] = u[i * nyg + 1];
    memset(rbuf, 0, sizeof(double) * nxg);
    MPI_Sendrecv(sbuf, nxg, MPI_DOUBLE, lo, 3, rbuf, nxg, MPI_DOUBLE, hi, 3, cart, MPI_STATUS_IGNORE);
    for (int i = 0; i < nxg; i++) u[i * nyg + ly + 1] = rbuf[i];
}

int main(int argc, char **argv) {
    int nx = 128, ny = 128, steps = 100;
    double alpha = 0.2;
    const char *run = NULL;
    for (int a = 1; a + 1 < argc; a += 2) {
        if (!strcmp(argv[a], "--nx")) nx = atoi(argv[a + 1]);
        else if (!strcmp(argv[a], "--ny")) ny = atoi(argv[a + 1]);
        else if (!strcmp(argv[a], "--steps")) steps = atoi(argv[a + 1]);
        else if (!strcmp(argv[a], "--alpha")) alpha = atof(argv[a + 1]);
        else if (!strcmp(argv[a], "--run")) run = argv[a + 1];
    }
    MPI_Init(&argc, &argv);
    int size, dims[2] = {0, 0}, periods[2] = {0, 0}, coords[2], rank;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Dims_create(size, 2, dims);
    MPI_Comm cart;
    MPI_Cart_create(MPI_COMM_WORLD, 2, dims, periods, 0, &cart);
    MPI_Comm_rank(cart, &rank);
    MPI_Cart_coords(cart, rank, 2, coords);
    int x0, lx, y0, ly;
    split(nx, dims[0], coords[0], &x0, &lx);
    split(ny, dims[1], coords[1], &y0, &ly);
    const int nyg = ly + 2;
    const int64_t nelems = (int64_t)(lx + 2) * nyg;
    double *u = calloc((size_t)nelems, sizeof(double));
    double *lap = calloc((size_t)lx * ly, sizeof(double));
    double *sbuf = calloc((size_t)(lx > ly ? lx : ly) + 2, sizeof(double));
    double *rbuf = calloc((size_t)(lx > ly ? lx : ly) + 2, sizeof(double));
    for (int i = 0; i < lx; i++)
        for (int j = 0; j < ly; j++) {
            int hot = fabs((x0 + i) - nx / 2.0) < nx / 16.0 && fabs((y0 + j) - ny / 2.0) < ny / 16.0;
            u[(i + 1) * nyg + j + 1] = hot ? 100.0 : 0.0;
        }

    /* insitu: declare the field once (its block position comes from the Cartesian communicator) */
    if (INSITU_CHECK_VERSION() != INSITU_OK && rank == 0) fprintf(stderr, "heat2d: %s\n", insitu_last_error());
    const int64_t gshape[2] = {nx, ny}, lshape[2] = {lx, ly};
    const insitu_array_decl_t decl = {"temperature", INSITU_FLOAT64, 2, gshape, lshape, NULL};
    insitu_bridge_t *bridge = NULL;
    insitu_init(cart, run, 1, &decl, &bridge); /* a failure is logged once and disables insitu */
    const int64_t mem[2] = {lx + 2, ly + 2}, sel_start[2] = {1, 1}, sel_count[2] = {lx, ly};
    const insitu_field_t field = {"temperature", u, INSITU_FLOAT64, INSITU_ORDER_C, 2, mem, sel_start, sel_count,
                                  nelems};

    int last = -1;
    for (int step = 0; step < steps; step++) {
        exchange(cart, u, lx, ly, sbuf, rbuf);
        for (int i = 1; i <= lx; i++)
            for (int j = 1; j <= ly; j++) {
                const double *c = &u[i * nyg + j];
                lap[(i - 1) * ly + j - 1] = c[-nyg] + c[nyg] + c[-1] + c[1] - 4 * c[0];
            }
        for (int i = 1; i <= lx; i++)
            for (int j = 1; j <= ly; j++) u[i * nyg + j] += alpha * lap[(i - 1) * ly + j - 1];

        /* insitu: send the interior, ghost cells stay in place (collective) */
        insitu_status_t s = insitu_send(bridge, step, 1, &field);
        if (s != INSITU_OK && s != INSITU_DISABLED && rank == 0)
            fprintf(stderr, "heat2d: step %d: %s: %s\n", step, insitu_status_name(s), insitu_last_error());
        last = step;
        /* insitu: steering (the same value at the same step on every rank) */
        int64_t stop = 0;
        int found = 0;
        if (insitu_get_int(bridge, "stop", &stop, &found) == INSITU_OK && found && stop) break;
    }
    insitu_finalize(&bridge); /* insitu: end of stream for this rank */
    if (rank == 0) printf("heat2d.c: %d ranks (%dx%d), last step %d\n", size, dims[0], dims[1], last);
    free(u);
    free(lap);
    free(sbuf);
    free(rbuf);
    MPI_Comm_free(&cart);
    MPI_Finalize();
    return 0;
}
