! insitu.f90 -- Fortran 2018 bindings of libinsitu (see c/include/insitu.h; assumed-rank arrays, gfortran >= 10).
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
! - A step carries every array: insitu_stage(bridge, name, u, start, count) each one (real32,
!   real64, int32, int64 or int8, rank 1 to 8, contiguous), then insitu_send(bridge, step)
!   sends them all in one collective step (step: a 32- or 64-bit integer), as the C
!   insitu_send does with its array of fields. insitu_stage is local; insitu_init and
!   insitu_send are collective. A staged array is read when insitu_send runs: keep it
!   allocated until then; it may be modified as soon as insitu_send returns.
module insitu
    use, intrinsic :: iso_c_binding
    implicit none
    private

    integer, parameter, public :: INSITU_OK = 0, INSITU_ERR_NULL = 1, INSITU_ERR_ARG = 2, INSITU_ERR_NAME = 3, &
        INSITU_ERR_SIZE = 4, INSITU_ERR_DTYPE = 5, INSITU_ERR_STATE = 6, INSITU_ERR_SEND = 7, &
        INSITU_ERR_CONTRACT = 8, INSITU_ERR_TIMEOUT = 9, INSITU_ERR_ANALYTICS = 10, INSITU_ERR_RUNTIME = 11, &
        INSITU_ERR_VERSION = 12, INSITU_DISABLED = 13, INSITU_ERR_MPI_MISMATCH = 14
    integer, parameter, public :: INSITU_FLOAT64 = 0, INSITU_FLOAT32 = 1, INSITU_INT64 = 2, INSITU_INT32 = 3, &
        INSITU_UINT8 = 4, INSITU_INT8 = 5
    integer, parameter :: ORDER_F = 1, MAX_NDIM = 8, NAME_LEN = 64

    !> One array staged for the next insitu_send.
    type :: staged_field
        character(kind=c_char, len=NAME_LEN + 1) :: name = c_null_char
        type(c_ptr) :: data = c_null_ptr
        integer(c_int) :: dtype = INSITU_FLOAT64
        integer(c_int) :: ndim = 0
        integer(c_int64_t) :: mem(MAX_NDIM) = 0, sel_start(MAX_NDIM) = 0, sel_count(MAX_NDIM) = 0
        integer(c_int64_t) :: nelems = 0
    end type staged_field

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
        type(staged_field), allocatable :: staged(:)
        integer :: nstaged = 0
    end type insitu_bridge

    !> Message of the last call that failed in this module before reaching the library ('' if none).
    character(len=:), allocatable, save :: local_error

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
        integer(c_int) function c_start_mpi(program_version) bind(C, name="insitu_start_mpi")
            import :: c_int, c_char
            character(kind=c_char) :: program_version(*)
        end function c_start_mpi
        integer(c_int) function c_start_agreed(rank, python_rank, mpi_rank, bridge) bind(C, name="insitu_start_agreed")
            import :: c_int, c_ptr
            integer(c_int), value :: rank, python_rank, mpi_rank
            type(c_ptr) :: bridge
        end function c_start_agreed
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

    !> Stage one array for the next insitu_send (local; any rank from 1 to 8).
    interface insitu_stage
        module procedure stage_real64, stage_real32, stage_int64, stage_int32, stage_int8
    end interface insitu_stage

    !> Send every staged array as one step (collective); step is a 32- or 64-bit integer.
    interface insitu_send
        module procedure send_i4, send_i8
    end interface insitu_send

    public :: insitu_declare, insitu_init, insitu_stage, insitu_send, insitu_get_int, insitu_get_double, &
        insitu_get_string, insitu_finalize, insitu_last_error

contains

    subroutine set_ierr(status, ierr)
        integer(c_int), intent(in) :: status
        integer, intent(out), optional :: ierr
        local_error = ''
        if (present(ierr)) ierr = int(status)
    end subroutine set_ierr

    !> A local error found before calling the library: its status and message (insitu_last_error).
    subroutine fail_here(status, message, ierr)
        integer, intent(in) :: status
        character(len=*), intent(in) :: message
        integer, intent(out), optional :: ierr
        local_error = message
        if (present(ierr)) ierr = status
    end subroutine fail_here

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
        character(len=MPI_MAX_LIBRARY_VERSION_STRING) :: version
        integer :: i, rank, mine(2), first(2), mpierr, vlen
        integer(c_int) :: status
        do i = 1, size(arrays)
            decls(i)%name = c_loc(arrays(i)%name)
            decls(i)%dtype = arrays(i)%dtype
            decls(i)%ndim = arrays(i)%ndim
            decls(i)%global_shape = c_loc(arrays(i)%global_shape)
            decls(i)%local_shape = c_loc(arrays(i)%local_shape)
            decls(i)%start = c_null_ptr
            if (arrays(i)%has_start) decls(i)%start = c_loc(arrays(i)%start)
        end do
        ! every rank starts its embedded Python and checks that mpi4py will use this program's MPI
        ! library, and the ranks agree on both outcomes (one allreduce) before anything calls
        ! mpi4py's MPI: a rank whose Python cannot start, or whose MPI check fails, fails every rank
        call MPI_Comm_rank(comm, rank, mpierr)
        call MPI_Get_library_version(version, vlen, mpierr)
        mine = huge(mine)
        status = c_start_mpi(cstr(version(1:vlen)))
        if (status == INSITU_ERR_MPI_MISMATCH) then
            mine(2) = rank
        else if (status /= INSITU_OK) then
            mine(1) = rank
        end if
        call MPI_Allreduce(mine, first, 2, MPI_INTEGER, MPI_MIN, comm, mpierr)
        if (any(first /= huge(first))) then
            ! INT_MAX (huge of c_int) means "no rank", whatever the kind of the default integer
            first = min(first, int(huge(0_c_int)))
            call set_ierr(c_start_agreed(int(rank, c_int), int(first(1), c_int), int(first(2), c_int), bridge%ptr), &
                ierr)
            return
        end if
        crun = cstr(run)
        run_ptr = c_null_ptr
        if (len_trim(run) > 0) run_ptr = c_loc(crun)
        call set_ierr(c_init(int(comm, c_int), run_ptr, int(size(arrays), c_int), c_loc(decls), bridge%ptr), ierr)
    end subroutine insitu_init

    !> Record an array (address, type, shape as passed, 1-based interior start and count) for the next
    !! insitu_send; staging a name again replaces it.
    subroutine stage_any(bridge, name, data, dtype, mem, contiguous, start, count, ierr)
        type(insitu_bridge), intent(inout) :: bridge
        character(len=*), intent(in) :: name
        type(c_ptr), intent(in) :: data
        integer, intent(in) :: dtype
        integer, intent(in) :: mem(:), start(:), count(:)
        logical, intent(in) :: contiguous
        integer, intent(out), optional :: ierr
        type(staged_field), allocatable :: grown(:)
        integer :: i, n
        character(len=16) :: r
        write (r, '(i0)') size(mem)
        if (size(mem) < 1 .or. size(mem) > MAX_NDIM) then
            call fail_here(INSITU_ERR_ARG, 'field ' // trim(name) // ' has rank ' // trim(r) // '; insitu takes 1 to 8', &
                ierr)
            return
        end if
        if (.not. contiguous) then
            call fail_here(INSITU_ERR_ARG, 'field ' // trim(name) // ' is not contiguous: stage the whole array and ' &
                // 'select the block with start and count', ierr)
            return
        end if
        if (size(start) /= size(mem) .or. size(count) /= size(mem)) then
            call fail_here(INSITU_ERR_SIZE, 'field ' // trim(name) // ': start and count need ' // trim(r) // &
                ' entries (the rank of the array)', ierr)
            return
        end if
        if (.not. allocated(bridge%staged)) allocate (bridge%staged(8))
        n = bridge%nstaged + 1
        do i = 1, bridge%nstaged
            if (bridge%staged(i)%name == cstr(name(1:min(len_trim(name), NAME_LEN)))) n = i
        end do
        if (n > size(bridge%staged)) then
            allocate (grown(2 * size(bridge%staged)))
            grown(1:bridge%nstaged) = bridge%staged(1:bridge%nstaged)
            call move_alloc(grown, bridge%staged)
        end if
        bridge%nstaged = max(bridge%nstaged, n)
        associate (f => bridge%staged(n))
            f%name = cstr(name(1:min(len_trim(name), NAME_LEN)))
            f%data = data
            f%dtype = int(dtype, c_int)
            f%ndim = int(size(mem), c_int)
            f%mem = 0
            f%sel_start = 0
            f%sel_count = 0
            f%mem(1:size(mem)) = int(mem, c_int64_t)
            f%sel_start(1:size(mem)) = int(start - 1, c_int64_t)
            f%sel_count(1:size(mem)) = int(count, c_int64_t)
            f%nelems = product(int(mem, c_int64_t))
        end associate
        call set_ierr(int(INSITU_OK, c_int), ierr)
    end subroutine stage_any

    !> Stage u (intent(in); read when insitu_send runs). start/count: 1-based position and
    !! extent of this rank's block inside u, one entry per dimension of u.
    subroutine stage_real64(bridge, name, u, start, count, ierr)
        type(insitu_bridge), intent(inout) :: bridge
        character(len=*), intent(in) :: name
        real(c_double), intent(in), target :: u(..)
        integer, intent(in) :: start(:), count(:)
        integer, intent(out), optional :: ierr
        call stage_any(bridge, name, c_loc(u), INSITU_FLOAT64, shape(u), is_contiguous(u), start, count, ierr)
    end subroutine stage_real64

    subroutine stage_real32(bridge, name, u, start, count, ierr)
        type(insitu_bridge), intent(inout) :: bridge
        character(len=*), intent(in) :: name
        real(c_float), intent(in), target :: u(..)
        integer, intent(in) :: start(:), count(:)
        integer, intent(out), optional :: ierr
        call stage_any(bridge, name, c_loc(u), INSITU_FLOAT32, shape(u), is_contiguous(u), start, count, ierr)
    end subroutine stage_real32

    subroutine stage_int64(bridge, name, u, start, count, ierr)
        type(insitu_bridge), intent(inout) :: bridge
        character(len=*), intent(in) :: name
        integer(c_int64_t), intent(in), target :: u(..)
        integer, intent(in) :: start(:), count(:)
        integer, intent(out), optional :: ierr
        call stage_any(bridge, name, c_loc(u), INSITU_INT64, shape(u), is_contiguous(u), start, count, ierr)
    end subroutine stage_int64

    subroutine stage_int32(bridge, name, u, start, count, ierr)
        type(insitu_bridge), intent(inout) :: bridge
        character(len=*), intent(in) :: name
        integer(c_int32_t), intent(in), target :: u(..)
        integer, intent(in) :: start(:), count(:)
        integer, intent(out), optional :: ierr
        call stage_any(bridge, name, c_loc(u), INSITU_INT32, shape(u), is_contiguous(u), start, count, ierr)
    end subroutine stage_int32

    subroutine stage_int8(bridge, name, u, start, count, ierr)
        type(insitu_bridge), intent(inout) :: bridge
        character(len=*), intent(in) :: name
        integer(c_int8_t), intent(in), target :: u(..)
        integer, intent(in) :: start(:), count(:)
        integer, intent(out), optional :: ierr
        call stage_any(bridge, name, c_loc(u), INSITU_INT8, shape(u), is_contiguous(u), start, count, ierr)
    end subroutine stage_int8

    !> Send every staged array as step (collective) and empty the stage, whatever the outcome.
    subroutine send_i8(bridge, step, ierr)
        type(insitu_bridge), intent(inout), target :: bridge
        integer(c_int64_t), intent(in) :: step
        integer, intent(out), optional :: ierr
        type(c_field), target :: fields(max(bridge%nstaged, 1))
        integer :: i
        do i = 1, bridge%nstaged
            fields(i)%name = c_loc(bridge%staged(i)%name)
            fields(i)%data = bridge%staged(i)%data
            fields(i)%dtype = bridge%staged(i)%dtype
            fields(i)%order = ORDER_F
            fields(i)%ndim = bridge%staged(i)%ndim
            fields(i)%mem_shape = c_loc(bridge%staged(i)%mem)
            fields(i)%sel_start = c_loc(bridge%staged(i)%sel_start)
            fields(i)%sel_count = c_loc(bridge%staged(i)%sel_count)
            fields(i)%nelems = bridge%staged(i)%nelems
        end do
        call set_ierr(c_send(bridge%ptr, step, int(bridge%nstaged, c_int), c_loc(fields)), ierr)
        bridge%nstaged = 0
    end subroutine send_i8

    subroutine send_i4(bridge, step, ierr)
        type(insitu_bridge), intent(inout), target :: bridge
        integer(c_int32_t), intent(in) :: step
        integer, intent(out), optional :: ierr
        call send_i8(bridge, int(step, c_int64_t), ierr)
    end subroutine send_i4

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
        if (allocated(local_error)) then
            if (len(local_error) > 0) then
                msg = local_error
                return
            end if
        end if
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
