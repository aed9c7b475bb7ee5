! heat2d.f90 -- the heat2d simulation of examples/python/heat2d.py in Fortran, coupled to insitu.
!
! Same grid, initial condition, stencil and decomposition; the field u(i, j) keeps its
! Fortran index order and reaches Dask with the same axis order as the C and Python
! versions. The insitu calls are marked "insitu:".
!
! Build:  mpif90 -c $(insitu config --fortran) && mpif90 heat2d.f90 insitu.o $(insitu config --libs) -o heat2d_f
! Run:    mpiexec -n 4 ./heat2d_f --run demo --nx 128 --ny 128 --steps 100
program heat2d
    use mpi
    use insitu
    use, intrinsic :: iso_c_binding, only: c_int64_t
    implicit none
    integer :: nx = 128, ny = 128, steps = 100, ierr, nprocs, rank, cart, step, last, a, i, j
    integer :: dims(2) = 0, coords(2), x0, lx, y0, ly, lo, hi, status
    logical :: periods(2) = .false., found
    double precision :: alpha = 0.2d0
    double precision, allocatable :: u(:, :), lap(:, :), rbuf(:)
    character(len=256) :: arg, val, run
    type(insitu_array) :: decl(1)
    type(insitu_bridge) :: bridge
    integer(c_int64_t) :: stop_flag

    run = ''
    a = 1
    do while (a < command_argument_count())
        call get_command_argument(a, arg)
        call get_command_argument(a + 1, val)
        select case (trim(arg))
        case ('--nx'); read (val, *) nx
        case ('--ny'); read (val, *) ny
        case ('--steps'); read (val, *) steps
        case ('--alpha'); read (val, *) alpha
        case ('--run'); run = val
        end select
        a = a + 2
    end do

    call MPI_Init(ierr)
    call MPI_Comm_size(MPI_COMM_WORLD, nprocs, ierr)
    call MPI_Dims_create(nprocs, 2, dims, ierr)
    call MPI_Cart_create(MPI_COMM_WORLD, 2, dims, periods, .false., cart, ierr)
    call MPI_Comm_rank(cart, rank, ierr)
    call MPI_Cart_coords(cart, rank, 2, coords, ierr)
    call split(nx, dims(1), coords(1), x0, lx)
    call split(ny, dims(2), coords(2), y0, ly)
    allocate (u(0:lx + 1, 0:ly + 1), lap(lx, ly), rbuf(0:max(lx, ly) + 1))
    u = 0
    do j = 1, ly
        do i = 1, lx
            if (abs((x0 + i - 1) - nx / 2d0) < nx / 16d0 .and. abs((y0 + j - 1) - ny / 2d0) < ny / 16d0) u(i, j) = 100
        end do
    end do

    ! insitu: declare the field once; its block position comes from the Cartesian communicator
    call insitu_declare(decl(1), 'temperature', INSITU_FLOAT64, [nx, ny], [lx, ly])
    call insitu_init(bridge, cart, run, decl)  ! a failure is logged once and disables insitu

    last = -1
    do step = 0, steps - 1
        call exchange()
        lap = u(0:lx - 1, 1:ly) + u(2:lx + 1, 1:ly) + u(1:lx, 0:ly - 1) + u(1:lx, 2:ly + 1) - 4 * u(1:lx, 1:ly)
        u(1:lx, 1:ly) = u(1:lx, 1:ly) + alpha * lap

        ! insitu: stage the interior (positions 2..lx+1 of u, ghost cells in place; local), then
        ! send every staged array as this step (collective)
        call insitu_stage(bridge, 'temperature', u, [2, 2], [lx, ly])
        call insitu_send(bridge, step, status)
        if (status /= INSITU_OK .and. status /= INSITU_DISABLED .and. rank == 0) &
            write (0, '(a,i0,a,a)') 'heat2d: step ', step, ': ', insitu_last_error()
        last = step
        ! insitu: steering (the same value at the same step on every rank)
        stop_flag = 0
        call insitu_get_int(bridge, 'stop', stop_flag, found, status)
        if (status == INSITU_OK .and. found .and. stop_flag /= 0) exit
    end do
    call insitu_finalize(bridge)  ! insitu: end of stream for this rank
    if (rank == 0) write (*, '(a,i0,a,i0,a,i0,a,i0)') 'heat2d.f90: ', nprocs, ' ranks (', dims(1), 'x', dims(2), &
        '), last step ', last
    call MPI_Comm_free(cart, ierr)
    call MPI_Finalize(ierr)

contains

    subroutine split(n, parts, index, start, length)
        integer, intent(in) :: n, parts, index
        integer, intent(out) :: start, length
        length = n / parts
        if (index < mod(n, parts)) length = length + 1
        start = index * (n / parts) + min(index, mod(n, parts))
    end subroutine split

    ! ghost layers from the four neighbours; the plate's edges stay at 0
    subroutine exchange()
        double precision :: sbuf(0:max(lx, ly) + 1)
        call MPI_Cart_shift(cart, 0, 1, lo, hi, ierr)
        sbuf(0:ly + 1) = u(lx, :)
        rbuf = 0
        call MPI_Sendrecv(sbuf, ly + 2, MPI_DOUBLE_PRECISION, hi, 0, rbuf, ly + 2, MPI_DOUBLE_PRECISION, lo, 0, &
            cart, MPI_STATUS_IGNORE, ierr)
        u(0, :) = rbuf(0:ly + 1)
        sbuf(0:ly + 1) = u(1, :)
        rbuf = 0
        call MPI_Sendrecv(sbuf, ly + 2, MPI_DOUBLE_PRECISION, lo, 1, rbuf, ly + 2, MPI_DOUBLE_PRECISION, hi, 1, &
            cart, MPI_STATUS_IGNORE, ierr)
        u(lx + 1, :) = rbuf(0:ly + 1)
        call MPI_Cart_shift(cart, 1, 1, lo, hi, ierr)
        sbuf(0:lx + 1) = u(:, ly)
        rbuf = 0
        call MPI_Sendrecv(sbuf, lx + 2, MPI_DOUBLE_PRECISION, hi, 2, rbuf, lx + 2, MPI_DOUBLE_PRECISION, lo, 2, &
            cart, MPI_STATUS_IGNORE, ierr)
        u(:, 0) = rbuf(0:lx + 1)
        sbuf(0:lx + 1) = u(:, 1)
        rbuf = 0
        call MPI_Sendrecv(sbuf, lx + 2, MPI_DOUBLE_PRECISION, lo, 3, rbuf, lx + 2, MPI_DOUBLE_PRECISION, hi, 3, &
            cart, MPI_STATUS_IGNORE, ierr)
        u(:, ly + 1) = rbuf(0:lx + 1)
    end subroutine exchange

end program heat2d
