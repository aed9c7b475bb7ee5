! One MPI per process from Fortran: insitu_init's MPI check refuses, or passes, on every rank.
! Prints "init <status> <rank> | <message>" (status: the integer insitu status).
program mpi_check
    use mpi
    use insitu
    implicit none
    type(insitu_array) :: decl(1)
    type(insitu_bridge) :: bridge
    integer :: ierr, rank, status
    call MPI_Init(ierr)
    call MPI_Comm_rank(MPI_COMM_WORLD, rank, ierr)
    call insitu_declare(decl(1), 'x', INSITU_FLOAT64, [1], [merge(1, 0, rank == 0)], [1])
    call insitu_init(bridge, MPI_COMM_WORLD, 'mpi-check', decl, status)
    write (*, '(a, i0, a, i0, a, a)') 'init ', status, ' ', rank, ' | ', insitu_last_error()
    call insitu_finalize(bridge)
    call MPI_Finalize(ierr)
end program mpi_check
