! Several arrays per step from Fortran: a Gray-Scott reaction-diffusion model stages U and V (real64,
! rank 2) and four more arrays covering every type and rank 1 to 4, T (real32, rank 3), N (int32,
! rank 1), L (int64, rank 4) and B (int8, rank 2), then sends them all as one step, at 64-bit steps
! BASE + k. Every rank computes the whole (small, periodic) grid, split by columns (ny) over the ranks;
! U, V and T are staged as the full arrays with the block selected by start/count, N, L and B as
! arrays holding the block only.
! The test recomputes everything with numpy and compares element by element.
! Usage: reaction_diffusion_f RUN|- NX NY STEPS. Prints "<what> <status> <rank> | <message>" lines.
program reaction_diffusion
    use mpi
    use insitu
    use, intrinsic :: iso_c_binding, only: c_double, c_float, c_int8_t, c_int32_t, c_int64_t
    implicit none
    integer(c_int64_t), parameter :: BASE = 5000000000_c_int64_t
    real(c_double), parameter :: DU = 0.16d0, DV = 0.08d0, FEED = 0.035d0, KILL = 0.065d0
    integer :: nx, ny, steps, ierr, nprocs, rank, k, i, j, a, c, status, y0, ly, every_v
    real(c_double), allocatable :: u(:, :), v(:, :), nu(:, :), nv(:, :)
    real(c_float), allocatable :: t(:, :, :)
    integer(c_int32_t) :: n(4)
    integer(c_int64_t), allocatable :: l(:, :, :, :)
    integer(c_int8_t), allocatable :: b(:, :)
    character(len=256) :: run, arg
    type(insitu_array) :: decl(6)
    type(insitu_bridge) :: bridge

    call get_command_argument(1, run)
    if (run == '-') run = ''  ! INSITU_RUN
    call get_command_argument(2, arg)
    read (arg, *) nx
    call get_command_argument(3, arg)
    read (arg, *) ny
    call get_command_argument(4, arg)
    read (arg, *) steps
    every_v = 0  ! optional 5th argument: V at its own cadence, every every_v steps in a call of its own
    if (command_argument_count() >= 5) then
        call get_command_argument(5, arg)
        read (arg, *) every_v
    end if
    call MPI_Init(ierr)
    call MPI_Comm_size(MPI_COMM_WORLD, nprocs, ierr)
    call MPI_Comm_rank(MPI_COMM_WORLD, rank, ierr)
    ly = ny / nprocs + merge(1, 0, rank < mod(ny, nprocs))
    y0 = rank * (ny / nprocs) + min(rank, mod(ny, nprocs))
    allocate (u(nx, ny), v(nx, ny), nu(nx, ny), nv(nx, ny), t(nx, ny, 2), l(nx, ly, 2, 3), b(nx, ly))
    do j = 1, ny
        do i = 1, nx
            if (nx / 3 <= i - 1 .and. i - 1 < 2 * nx / 3 .and. ny / 3 <= j - 1 .and. j - 1 < 2 * ny / 3) then
                u(i, j) = 0.5d0
                v(i, j) = 0.25d0
            else
                u(i, j) = 1.0d0
                v(i, j) = 0.0d0
            end if
            u(i, j) = u(i, j) - 0.005d0 * mod((i - 1) + 2 * (j - 1), 3)
            v(i, j) = v(i, j) + 0.01d0 * mod(7 * (i - 1) + 3 * (j - 1), 5)
        end do
    end do

    ! global starts are 1-based; N is split by rank (4 each), the others by columns
    call insitu_declare(decl(1), 'U', INSITU_FLOAT64, [nx, ny], [nx, ly], [1, y0 + 1])
    call insitu_declare(decl(2), 'V', INSITU_FLOAT64, [nx, ny], [nx, ly], [1, y0 + 1])
    call insitu_declare(decl(3), 'T', INSITU_FLOAT32, [nx, ny, 2], [nx, ly, 2], [1, y0 + 1, 1])
    call insitu_declare(decl(4), 'N', INSITU_INT32, [4 * nprocs], [4], [4 * rank + 1])
    call insitu_declare(decl(5), 'L', INSITU_INT64, [nx, ny, 2, 3], [nx, ly, 2, 3], [1, y0 + 1, 1, 1])
    call insitu_declare(decl(6), 'B', INSITU_INT8, [nx, ny], [nx, ly], [1, y0 + 1])
    call insitu_init(bridge, MPI_COMM_WORLD, run, decl, status)
    write (*, '(a, i0, a, i0, a, a)') 'init ', status, ' ', rank, ' | ', insitu_last_error()

    ! local checks of insitu_stage: a strided section is refused (it would be a temporary copy)
    call insitu_stage(bridge, 'U', u(1:nx:2, :), [1, 1], [nx, ly], status)
    write (*, '(a, i0, a, i0, a, a)') 'stage-strided ', status, ' ', rank, ' | ', insitu_last_error()
    call insitu_stage(bridge, 'U', u, [1], [nx], status)
    write (*, '(a, i0, a, i0, a, a)') 'stage-short-start ', status, ' ', rank, ' | ', insitu_last_error()

    do k = 0, steps - 1
        nu = u + (DU * lap(u) - u * v * v + FEED * (1.0d0 - u))
        nv = v + (DV * lap(v) + u * v * v - (FEED + KILL) * v)
        u = nu
        v = nv
        t(:, :, 1) = real(u, c_float)
        t(:, :, 2) = real(v, c_float)
        n = [(1000 * rank + i + 10 * k, i = 0, 3)]
        do c = 1, 3
            do a = 1, 2
                do j = 1, ly
                    do i = 1, nx
                        l(i, j, a, c) = 2_c_int64_t**40 + (i - 1) + 100 * (y0 + j - 1) + 10000 * (a - 1) &
                            + 100000 * (c - 1) + k
                    end do
                end do
            end do
        end do
        do j = 1, ly
            do i = 1, nx
                b(i, j) = int(mod((i - 1) + 2 * (y0 + j - 1) + k, 200) - 100, c_int8_t)
            end do
        end do
        if (every_v == 0) call insitu_stage(bridge, 'V', v, [1, y0 + 1], [nx, ly])
        call insitu_stage(bridge, 'U', v, [1, y0 + 1], [nx, ly])  ! replaced by the next line
        call insitu_stage(bridge, 'U', u, [1, y0 + 1], [nx, ly])
        call insitu_stage(bridge, 'T', t, [1, y0 + 1, 1], [nx, ly, 2])
        call insitu_stage(bridge, 'N', n, [1], [4])
        call insitu_stage(bridge, 'L', l, [1, 1, 1, 1], [nx, ly, 2, 3])
        call insitu_stage(bridge, 'B', b, [1, 1], [nx, ly])
        call insitu_send(bridge, BASE + k, status)  ! one collective step, six arrays (five at V's own cadence)
        write (*, '(a, i0, a, i0, a, i0, a, a)') 'send-', k, ' ', status, ' ', rank, ' | ', insitu_last_error()
        if (every_v > 0) then
            if (mod(k, every_v) == 0) then  ! a second call of the same step, carrying V alone
                call insitu_stage(bridge, 'V', v, [1, y0 + 1], [nx, ly])
                call insitu_send(bridge, BASE + k, status)
                write (*, '(a, i0, a, i0, a, i0, a, a)') 'sendv-', k, ' ', status, ' ', rank, ' | ', &
                    insitu_last_error()
            end if
        end if
    end do
    call insitu_finalize(bridge, status)
    write (*, '(a, i0, a, i0, a)') 'finalize ', status, ' ', rank, ' |'
    call MPI_Finalize(ierr)

contains

    !> Periodic 5-point Laplacian, summed in the order of the C version and of numpy's reference.
    function lap(f) result(out)
        real(c_double), intent(in) :: f(:, :)
        real(c_double) :: out(size(f, 1), size(f, 2))
        out = cshift(f, -1, 1) + cshift(f, 1, 1) + cshift(f, -1, 2) + cshift(f, 1, 2) - 4.0d0 * f
    end function lap

end program reaction_diffusion
