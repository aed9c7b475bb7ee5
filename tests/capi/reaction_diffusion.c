/* Two arrays per step from C: a Gray-Scott reaction-diffusion model sends U and V in one insitu_send.
 *
 * Every rank computes the whole (small, periodic) grid and sends its block of U and V as a memory
 * selection of the full arrays, at 64-bit steps BASE + k. The test recomputes the model with
 * numpy and compares what the analytics received element by element.
 * Usage: reaction_diffusion RUN|- NX NY STEPS [EVERY_V]: with EVERY_V, U is sent every step and V every
 * EVERY_V steps in a second call of the step (arrays at their own cadence). Prints "send-<k> <status> <rank> | <message>" for every step. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "insitu.h"

#define BASE 5000000000LL /* steps beyond 32 bits */
#define DU 0.16
#define DV 0.08
#define FEED 0.035
#define KILL 0.065

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    const char *run = strcmp(argv[1], "-") == 0 ? NULL : argv[1]; /* "-": INSITU_RUN */
    const int nx = atoi(argv[2]), ny = atoi(argv[3]), steps = atoi(argv[4]);
    const int every_v = argc > 5 ? atoi(argv[5]) : 0; /* V at its own cadence, in a call of its own */
    int nprocs = 0, rank = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &nprocs);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    /* rows split by rank (uneven), whole columns: explicit global starts */
    const int extra = nx % nprocs, lx = nx / nprocs + (rank < extra);
    const int x0 = rank * (nx / nprocs) + (rank < extra ? rank : extra);

    double *u = malloc(sizeof(double) * nx * ny), *v = malloc(sizeof(double) * nx * ny);
    double *nu = malloc(sizeof(double) * nx * ny), *nv = malloc(sizeof(double) * nx * ny);
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < ny; j++) {
            int inside = nx / 3 <= i && i < 2 * nx / 3 && ny / 3 <= j && j < 2 * ny / 3;
            u[i * ny + j] = (inside ? 0.5 : 1.0) - 0.005 * ((i + 2 * j) % 3);
            v[i * ny + j] = (inside ? 0.25 : 0.0) + 0.01 * ((7 * i + 3 * j) % 5);
        }

    const int64_t gshape[2] = {nx, ny}, lshape[2] = {lx, ny}, start[2] = {x0, 0};
    const insitu_array_decl_t decls[2] = {{"U", INSITU_FLOAT64, 2, gshape, lshape, start},
                                          {"V", INSITU_FLOAT64, 2, gshape, lshape, start}};
    insitu_bridge_t *b = NULL;
    insitu_status_t s = insitu_init(MPI_COMM_WORLD, run, 2, decls, &b);
    printf("init %s %d | %s\n", insitu_status_name(s), rank, s == INSITU_OK ? "" : insitu_last_error());

    const int64_t mem[2] = {nx, ny}, sel_start[2] = {x0, 0}, sel_count[2] = {lx, ny};
    for (int k = 0; k < steps; k++) {
        for (int i = 0; i < nx; i++)
            for (int j = 0; j < ny; j++) {
                const int im = (i + nx - 1) % nx, ip = (i + 1) % nx, jm = (j + ny - 1) % ny, jp = (j + 1) % ny;
                const double uc = u[i * ny + j], vc = v[i * ny + j];
                const double lu = u[im * ny + j] + u[ip * ny + j] + u[i * ny + jm] + u[i * ny + jp] - 4.0 * uc;
                const double lv = v[im * ny + j] + v[ip * ny + j] + v[i * ny + jm] + v[i * ny + jp] - 4.0 * vc;
                const double uvv = uc * vc * vc;
                nu[i * ny + j] = uc + (DU * lu - uvv + FEED * (1.0 - uc));
                nv[i * ny + j] = vc + (DV * lv + uvv - (FEED + KILL) * vc);
            }
        double *t = u;
        u = nu, nu = t;
        t = v, v = nv, nv = t;
        const insitu_field_t fields[2] = {
            {"U", u, INSITU_FLOAT64, INSITU_ORDER_C, 2, mem, sel_start, sel_count, (int64_t)nx * ny},
            {"V", v, INSITU_FLOAT64, INSITU_ORDER_C, 2, mem, sel_start, sel_count, (int64_t)nx * ny}};
        s = insitu_send(b, BASE + k, every_v ? 1 : 2, fields); /* one collective step carrying both arrays */
        printf("send-%d %s %d | %s\n", k, insitu_status_name(s), rank, s == INSITU_OK ? "" : insitu_last_error());
        if (every_v && k % every_v == 0) { /* a second call of the same step, carrying V alone */
            s = insitu_send(b, BASE + k, 1, &fields[1]);
            printf("sendv-%d %s %d | %s\n", k, insitu_status_name(s), rank, s == INSITU_OK ? "" : insitu_last_error());
        }
    }
    s = insitu_finalize(&b);
    printf("finalize %s %d | %s\n", insitu_status_name(s), rank, s == INSITU_OK ? "" : insitu_last_error());
    free(u), free(v), free(nu), free(nv);
    MPI_Finalize();
    return 0;
}
