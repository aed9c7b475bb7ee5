! insitu.f90 -- Fortran 2008 bindings of libinsitu (see c/include/insitu.h).
!
! Compile this file with the same compiler and MPI as the simulation:
!     mpif90 -c $(insitu config --fortran)            ! gives insitu.mod and insitu.o
!     mpif90 sim.f90 insitu.o $(insitu config --libs)
!
! Conventions
! - Communicators are Fortran integers (MPI_COMM_WORLD, or from MPI_Cart_create).
! - Arrays keep their Fortran index order: a field u(nx, ny) is shown to Dask with shape
!   (nx, ny), u(i, j) at [i-1, j-1], the same axis order as the C and Python versions.
! - Starts are 1-based: the global start of a block (u(1,1) of the whole field is (1,1)),
!   and the start of the interior inside the array as passed (its first element is 1,
!   whatever the declared lower bounds: for u(0:lx+1, 0:ly+1) the interior starts at (2,2)).
! - ierr is an optional last argument (an insitu status; 0 = INSITU_OK). Fatal errors are
!   logged once by the library and disable insitu, so omitting ierr is safe.
! - Collective / buffer rules are those of the C calls: insitu_init and insitu_send are
!   collective; the field may be modified as soon as insitu_send returns.
module insitu
    use, intrinsic :: iso_c_binding
    implicit none
    private

    integer, parameter, public :: INSITU_OK = 0, INSITU_ERR_NULL = 1, INSITU_ERR_ARG = 2, INSITU_ERR_NAME = 3, &
        INSITU_ERR_SIZE = 4, INSITU_ERR_DTYPE = 5, INSITU_ERR_STATE = 6, INSITU_ERR_SEND = 7, &
        INSITU_ERR_CONTRACT = 8, INSITU_ERR_TIMEOUT = 9, INSITU_ERR_ANALYTICS = 10, INSITU_ERR_RUNTIME = 11, &
        INSITU_ERR_VERSION = 12, INSITU_DISABLED = 13
    integer, parameter, public :: INSITU_FLOAT64 = 0, INSITU_FLOAT32 = 1, INSITU_INT64 = 2, INSITU_INT32 = 3
    integer, parameter :: ORDER_F = 1, MAX_NDIM = 8, NAME_LEN = 64

    !> Declaration of one array (fill with insitu_declare).
    type, public :: insitu_array
        character(kind=c_char, len=NAME_LEN + 1) :: name = c_null_char
        integer(c_int) :: dtype = INSITU_FLOAT64
        integer(c_int) :: ndim = 0
        integer(c_int64_t) :: global_shape(MAX_NDIM) = 0
        integer(c_int64_t) :: local_shape(MAX_NDIM) = 0
        integer(c_int64_t) :: start(MAX_NDIM) = 0
        logical :: has_start = .false.
    end type insitu_array

    !> Opaque bridge handle.
    type, public :: insitu_bridge
        type(c_ptr) :: ptr = c_null_ptr
    end type insitu_bridge

    type, bind(C) :: c_decl
        type(c_ptr) :: name
        integer(c_int) :: dtype
        integer(c_int) :: ndim
        type(c_ptr) :: global_shape, local_shape, start
    end type c_decl

    type, bind(C) :: c_field
        type(c_ptr) :: name
        type(c_ptr) :: data
        integer(c_int) :: dtype
        integer(c_int) :: order
        integer(c_int) :: ndim
        type(c_ptr) :: mem_shape, sel_start, sel_count
        integer(c_int64_t) :: nelems
    end type c_field

    interface
        integer(c_int) function c_init(comm_f, run, narrays, arrays, bridge) bind(C, name="insitu_init_f")
            import :: c_int, c_ptr
            integer(c_int), value :: comm_f
            type(c_ptr), value :: run
            integer(c_int), value :: narrays
            type(c_ptr), value :: arrays
            type(c_ptr) :: bridge
        end function c_init
        integer(c_int) function c_start() bind(C, name="insitu_start")
            import :: c_int
        end function c_start
        integer(c_int) function c_start_failed(failed_rank, bridge) bind(C, name="insitu_start_failed")
            import :: c_int, c_ptr
            integer(c_int), value :: failed_rank
            type(c_ptr) :: bridge
        end function c_start_failed
        integer(c_int) function c_send(bridge, step, nfields, fields) bind(C, name="insitu_send")
            import :: c_int, c_ptr, c_int64_t
            type(c_ptr), value :: bridge
            integer(c_int64_t), value :: step
            integer(c_int), value :: nfields
            type(c_ptr), value :: fields
        end function c_send
        integer(c_int) function c_get_int(bridge, key, value, found) bind(C, name="insitu_get_int")
            import :: c_int, c_ptr, c_int64_t, c_char
            type(c_ptr), value :: bridge
            character(kind=c_char) :: key(*)
            integer(c_int64_t) :: value
            integer(c_int) :: found
        end function c_get_int
        integer(c_int) function c_get_double(bridge, key, value, found) bind(C, name="insitu_get_double")
            import :: c_int, c_ptr, c_double, c_char
            type(c_ptr), value :: bridge
            character(kind=c_char) :: key(*)
            real(c_double) :: value
            integer(c_int) :: found
        end function c_get_double
        integer(c_int) function c_get_string(bridge, key, value, len, found) bind(C, name="insitu_get_string")
            import :: c_int, c_ptr, c_char, c_size_t
            type(c_ptr), value :: bridge
            character(kind=c_char) :: key(*)
            character(kind=c_char) :: value(*)
            integer(c_size_t), value :: len
            integer(c_int) :: found
        end function c_get_string
        integer(c_int) function c_finalize(bridge) bind(C, name="insitu_finalize")
            import :: c_int, c_ptr
            type(c_ptr) :: bridge
        end function c_finalize
        type(c_ptr) function c_last_error() bind(C, name="insitu_last_error")
            import :: c_ptr
        end function c_last_error
    end interface

    interface insitu_send
        module procedure send_real64_1d, send_real64_2d, send_real64_3d, send_real32_2d, send_real32_3d
    end interface insitu_send

    public :: insitu_declare, insitu_init, insitu_send, insitu_get_int, insitu_get_double, insitu_get_string, &
        insitu_finalize, insitu_last_error

contains

    subroutine set_ierr(status, ierr)
        integer(c_int), intent(in) :: status
        integer, intent(out), optional :: ierr
        if (present(ierr)) ierr = int(status)
    end subroutine set_ierr

    function cstr(s) result(out)
        character(len=*), intent(in) :: s
        character(kind=c_char, len=len_trim(s) + 1) :: out
        out = trim(s) // c_null_char
    end function cstr

    !> Fill one declaration: name, dtype, global shape and this rank's block shape
    !! (all zeros: no block); start is the 1-based global start of the block, omitted to
    !! take the block's position from a Cartesian communicator.
    subroutine insitu_declare(decl, name, dtype, global_shape, local_shape, start)
        type(insitu_array), intent(out) :: decl
        character(len=*), intent(in) :: name
        integer, intent(in) :: dtype
        integer, intent(in) :: global_shape(:), local_shape(:)
        integer, intent(in), optional :: start(:)
        integer :: n
        n = min(size(global_shape), MAX_NDIM)
        decl%name = cstr(name(1:min(len_trim(name), NAME_LEN)))
        decl%dtype = int(dtype, c_int)
        decl%ndim = int(size(global_shape), c_int)
        decl%global_shape(1:n) = int(global_shape(1:n), c_int64_t)
        decl%local_shape(1:min(size(local_shape), MAX_NDIM)) = int(local_shape(1:min(size(local_shape), MAX_NDIM)), &
            c_int64_t)
        if (present(start)) then
            decl%has_start = .true.
            decl%start(1:min(size(start), MAX_NDIM)) = int(start(1:min(size(start), MAX_NDIM)) - 1, c_int64_t)
        end if
    end subroutine insitu_declare

    !> Start insitu on communicator comm (collective). run may be '' (INSITU_RUN / SLURM job).
    subroutine insitu_init(bridge, comm, run, arrays, ierr)
        use mpi
        type(insitu_bridge), intent(out) :: bridge
        integer, intent(in) :: comm
        character(len=*), intent(in) :: run
        type(insitu_array), intent(in), target :: arrays(:)
        integer, intent(out), optional :: ierr
        type(c_decl), target :: decls(size(arrays))
        character(kind=c_char, len=len_trim(run) + 1), target :: crun
        type(c_ptr) :: run_ptr
        integer :: i, rank, mine, first, mpierr
        do i = 1, size(arrays)
            decls(i)%name = c_loc(arrays(i)%name)
            decls(i)%dtype = arrays(i)%dtype
            decls(i)%ndim = arrays(i)%ndim
            decls(i)%global_shape = c_loc(arrays(i)%global_shape)
            decls(i)%local_shape = c_loc(arrays(i)%local_shape)
            decls(i)%start = c_null_ptr
            if (arrays(i)%has_start) decls(i)%start = c_loc(arrays(i)%start)
        end do
        ! every rank starts its embedded Python, and the ranks agree on the outcome (one allreduce)
        ! before calling the library: a rank whose Python cannot start fails every rank
        call MPI_Comm_rank(comm, rank, mpierr)
        mine = huge(mine)
        if (c_start() /= INSITU_OK) mine = rank
        call MPI_Allreduce(mine, first, 1, MPI_INTEGER, MPI_MIN, comm, mpierr)
        if (first /= huge(first)) then
            call set_ierr(c_start_failed(int(first, c_int), bridge%ptr), ierr)
            return
        end if
        crun = cstr(run)
        run_ptr = c_null_ptr
        if (len_trim(run) > 0) run_ptr = c_loc(crun)
        call set_ierr(c_init(int(comm, c_int), run_ptr, int(size(arrays), c_int), c_loc(decls), bridge%ptr), ierr)
    end subroutine insitu_init

    subroutine send_any(bridge, step, name, data, dtype, ndim, mem, start, count, ierr)
        type(insitu_bridge), intent(in) :: bridge
        integer, intent(in) :: step, dtype, ndim
        character(len=*), intent(in) :: name
        type(c_ptr), intent(in) :: data
        integer(c_int64_t), intent(in), target :: mem(:)
        integer, intent(in) :: start(:), count(:)
        integer, intent(out), optional :: ierr
        type(c_field), target :: f
        character(kind=c_char, len=len_trim(name) + 1), target :: cname
        integer(c_int64_t), target :: sel_start(MAX_NDIM), sel_count(MAX_NDIM)
        integer :: n
        n = min(ndim, size(start), size(count), MAX_NDIM)
        sel_start = 0
        sel_count = 0
        sel_start(1:n) = int(start(1:n) - 1, c_int64_t)
        sel_count(1:n) = int(count(1:n), c_int64_t)
        if (size(start) /= ndim .or. size(count) /= ndim) sel_count(1) = -1 ! reported as a size error
        cname = cstr(name)
        f%name = c_loc(cname)
        f%data = data
        f%dtype = int(dtype, c_int)
        f%order = ORDER_F
        f%ndim = int(ndim, c_int)
        f%mem_shape = c_loc(mem)
        f%sel_start = c_loc(sel_start)
        f%sel_count = c_loc(sel_count)
        f%nelems = product(mem)
        call set_ierr(c_send(bridge%ptr, int(step, c_int64_t), 1_c_int, c_loc(f)), ierr)
    end subroutine send_any

    !> Send the block start(:)..start(:)+count(:)-1 of u (1-based positions in u) for step (collective).
    subroutine send_real64_1d(bridge, step, name, u, start, count, ierr)
        type(insitu_bridge), intent(in) :: bridge
        integer, intent(in) :: step
        character(len=*), intent(in) :: name
        real(c_double), intent(in), target, contiguous :: u(:)
        integer, intent(in) :: start(:), count(:)
        integer, intent(out), optional :: ierr
        call send_any(bridge, step, name, c_loc(u), INSITU_FLOAT64, 1, int(shape(u), c_int64_t), start, count, ierr)
    end subroutine send_real64_1d

    subroutine send_real64_2d(bridge, step, name, u, start, count, ierr)
        type(insitu_bridge), intent(in) :: bridge
        integer, intent(in) :: step
        character(len=*), intent(in) :: name
        real(c_double), intent(in), target, contiguous :: u(:, :)
        integer, intent(in) :: start(:), count(:)
        integer, intent(out), optional :: ierr
        call send_any(bridge, step, name, c_loc(u), INSITU_FLOAT64, 2, int(shape(u), c_int64_t), start, count, ierr)
    end subroutine send_real64_2d

    subroutine send_real64_3d(bridge, step, name, u, start, count, ierr)
        type(insitu_bridge), intent(in) :: bridge
        integer, intent(in) :: step
        character(len=*), intent(in) :: name
        real(c_double), intent(in), target, contiguous :: u(:, :, :)
        integer, intent(in) :: start(:), count(:)
        integer, intent(out), optional :: ierr
        call send_any(bridge, step, name, c_loc(u), INSITU_FLOAT64, 3, int(shape(u), c_int64_t), start, count, ierr)
    end subroutine send_real64_3d

    subroutine send_real32_2d(bridge, step, name, u, start, count, ierr)
        type(insitu_bridge), intent(in) :: bridge
        integer, intent(in) :: step
        character(len=*), intent(in) :: name
        real(c_float), intent(in), target, contiguous :: u(:, :)
        integer, intent(in) :: start(:), count(:)
        integer, intent(out), optional :: ierr
        call send_any(bridge, step, name, c_loc(u), INSITU_FLOAT32, 2, int(shape(u), c_int64_t), start, count, ierr)
    end subroutine send_real32_2d

    subroutine send_real32_3d(bridge, step, name, u, start, count, ierr)
        type(insitu_bridge), intent(in) :: bridge
        integer, intent(in) :: step
        character(len=*), intent(in) :: name
        real(c_float), intent(in), target, contiguous :: u(:, :, :)
        integer, intent(in) :: start(:), count(:)
        integer, intent(out), optional :: ierr
        call send_any(bridge, step, name, c_loc(u), INSITU_FLOAT32, 3, int(shape(u), c_int64_t), start, count, ierr)
    end subroutine send_real32_3d

    !> Steering value key as an integer (booleans read as 0/1); found is .false. if never set.
    subroutine insitu_get_int(bridge, key, value, found, ierr)
        type(insitu_bridge), intent(in) :: bridge
        character(len=*), intent(in) :: key
        integer(c_int64_t), intent(inout) :: value
        logical, intent(out) :: found
        integer, intent(out), optional :: ierr
        integer(c_int) :: f
        f = 0
        call set_ierr(c_get_int(bridge%ptr, cstr(key), value, f), ierr)
        found = f /= 0
    end subroutine insitu_get_int

    subroutine insitu_get_double(bridge, key, value, found, ierr)
        type(insitu_bridge), intent(in) :: bridge
        character(len=*), intent(in) :: key
        real(c_double), intent(inout) :: value
        logical, intent(out) :: found
        integer, intent(out), optional :: ierr
        integer(c_int) :: f
        f = 0
        call set_ierr(c_get_double(bridge%ptr, cstr(key), value, f), ierr)
        found = f /= 0
    end subroutine insitu_get_double

    subroutine insitu_get_string(bridge, key, value, found, ierr)
        type(insitu_bridge), intent(in) :: bridge
        character(len=*), intent(in) :: key
        character(len=*), intent(inout) :: value
        logical, intent(out) :: found
        integer, intent(out), optional :: ierr
        character(kind=c_char) :: buf(len(value) + 1)
        integer(c_int) :: f
        integer :: i
        f = 0
        call set_ierr(c_get_string(bridge%ptr, cstr(key), buf, int(len(value) + 1, c_size_t), f), ierr)
        found = f /= 0
        if (found) then
            value = ' '
            do i = 1, len(value)
                if (buf(i) == c_null_char) exit
                value(i:i) = buf(i)
            end do
        end if
    end subroutine insitu_get_string

    !> End the stream for this rank and release the bridge (not collective).
    subroutine insitu_finalize(bridge, ierr)
        type(insitu_bridge), intent(inout) :: bridge
        integer, intent(out), optional :: ierr
        call set_ierr(c_finalize(bridge%ptr), ierr)
    end subroutine insitu_finalize

    !> Message of the last failed call.
    function insitu_last_error() result(msg)
        character(len=:), allocatable :: msg
        character(kind=c_char), pointer :: p(:)
        integer :: n
        call c_f_pointer(c_last_error(), p, [2048])
        n = 0
        do while (n < 2048)
            if (p(n + 1) == c_null_char) exit
            n = n + 1
        end do
        allocate (character(len=n) :: msg)
        msg = transfer(p(1:n), msg)
    end function insitu_last_error

end module insitu
